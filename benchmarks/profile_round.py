#!/usr/bin/env python3
"""Where one round's time goes: a ``jax.profiler`` trace of the compiled round, per kernel.

XLA's CPU runtime records one trace event per kernel it runs (a fusion, a dot, a copy), named
after the HLO instruction. Each instruction is put in a category from its opcode and from
the Python function that produced it (the HLO's stack-frame metadata): dense matmuls,
attention, layer norms, the optimizer update, scatter/gather, the heatmap blur, copies and
transposes, other elementwise work. Times are summed over the traced rounds; kernels of one
round can run on both cores at once, so their sum can exceed the round's wall time.

  python benchmarks/profile_round.py --data-dir ../shared/data --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from workload import Workload, build

CATEGORIES = (
  "dense matmuls",
  "attention",
  "layer norms",
  "LSTM gates",
  "optimizer update",
  "scatter/gather",
  "heatmap blur",
  "copies and transposes",
  "other elementwise",
)
_MOVES = {"parameter", "bitcast", "constant", "broadcast", "copy", "transpose", "reshape"}
_INDEXING = {"scatter", "gather", "dynamic-slice", "dynamic-update-slice", "select-and-scatter"}
# Their trace events enclose those of the kernels they run.
_CONTAINERS = {"while", "conditional", "call"}
_HEATMAP = {"_blur", "_lon_kernel_spectra", "_row_mixing", "heatmaps", "combined"}


def _section(text: str, title: str) -> list[str]:
  found = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
  return found.group(1).splitlines() if found else []


def _frames(text: str) -> dict[int, tuple[str, str]]:
  """Stack frame id -> (file, function) of the innermost Python frame."""
  names = lambda title: {
    int(x.split()[0]): x.split(None, 1)[1].strip('"') for x in _section(text, title)
  }
  files, functions = names("FileNames"), names("FunctionNames")
  locations = {}
  for line in _section(text, "FileLocations"):
    file_id = int(re.search(r"file_name_id=(\d+)", line).group(1))
    function_id = int(re.search(r"function_name_id=(\d+)", line).group(1))
    locations[int(line.split()[0])] = (files[file_id], functions[function_id])
  return {
    int(line.split()[0]): locations[int(re.search(r"file_location_id=(\d+)", line).group(1))]
    for line in _section(text, "StackFrames")
  }


_ORIGINS = (  # (test on the innermost frame's file and function, category), first match wins
  (lambda file, function: "optax" in file, "optimizer update"),
  (lambda file, function: function == "_splat", "scatter/gather"),
  (lambda file, function: function in _HEATMAP, "heatmap blur"),
  (lambda file, function: function == "dot_product_attention", "attention"),
  (lambda file, function: file.endswith("recurrent.py"), "LSTM gates"),
  (
    lambda file, function: "LayerNorm" in function or function in ("_compute_stats", "_normalize"),
    "layer norms",
  ),
)


def _origin(frames: dict[int, tuple[str, str]], line: str) -> str:
  found = re.search(r"stack_frame_id=(\d+)", line)
  if found and int(found.group(1)) in frames:
    file, function = frames[int(found.group(1))]
    for test, category in _ORIGINS:
      if test(file, function):
        return category
  return "other elementwise"


def categorize(hlo_text: str) -> dict[str, str]:
  """Every kernel-level HLO instruction's name -> its category."""
  frames = _frames(hlo_text)
  bodies: dict[str, list[tuple[str, str]]] = {}  # computation -> [(opcode, line)]
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%([\w.-]+) \(.*\{$", line)
    if header:
      current = bodies.setdefault(header.group(1), [])
    elif current is not None and (
      ins := re.match(r"^\s*(?:ROOT )?%[\w.-]+ = .*? ([a-z][\w-]*)\(", line)
    ):
      current.append((ins.group(1), line))
  categories = {}
  for body in bodies.values():
    for opcode, line in body:
      if opcode in _CONTAINERS:
        continue
      name = re.match(r"^\s*(?:ROOT )?%([\w.-]+)", line).group(1)
      called = re.search(r"calls=%([\w.-]+)", line)
      inner = bodies.get(called.group(1), []) if opcode == "fusion" and called else [(opcode, line)]
      ops = [(op, text) for op, text in inner if op not in ("parameter", "bitcast", "constant")]
      dots = [text for op, text in ops if op == "dot"]
      if dots:
        attention = any(_origin(frames, text) == "attention" for text in dots)
        categories[name] = "attention" if attention else "dense matmuls"
      elif any(op in _INDEXING for op, _ in ops):
        categories[name] = "scatter/gather"
      elif all(op in _MOVES for op, _ in ops):
        categories[name] = "copies and transposes"
      else:
        origins = collections.Counter(_origin(frames, text) for op, text in ops if op not in _MOVES)
        categories[name] = origins.most_common(1)[0][0]
  return categories


def profile(workload: Workload, rounds: int) -> dict[str, Any]:
  """Traces ``rounds`` compiled rounds of ``workload``; time per category per round."""
  built = build(workload)
  state = jax.jit(built.algorithm.init)(jax.random.key(0), built.data)
  compiled = (
    jax.jit(built.algorithm.apply, donate_argnums=0)
    .lower(state, built.data, jax.random.key(1))
    .compile()
  )
  categories = categorize(compiled.as_text())
  keys = iter(jax.random.split(jax.random.key(2), rounds + 2))
  for _ in range(2):  # the generator switches on after FedGen's first round
    state, _ = jax.block_until_ready(compiled(state, built.data, next(keys)))
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(rounds):
      state, _ = jax.block_until_ready(compiled(state, built.data, next(keys)))
    wall = (time.perf_counter() - t0) / rounds
    jax.profiler.stop_trace()
    (trace,) = Path(folder).rglob("*.trace.json.gz")
    with gzip.open(trace) as stream:
      events = json.load(stream)["traceEvents"]
  per_category: collections.Counter[str] = collections.Counter()
  per_kernel: collections.Counter[str] = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in categories:
      per_category[categories[event["name"]]] += event["dur"] / 1e6 / rounds
      per_kernel[event["name"]] += event["dur"] / 1e6 / rounds
  return {
    "wall_s": wall,
    "categories": per_category,
    "top": [(k, categories[k], s) for k, s in per_kernel.most_common(5)],
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", help="data root (default: $FEDVP_DATA)")
  parser.add_argument("--dataset", default="David-m10-h1")
  parser.add_argument("--rounds", type=int, default=3, help="traced rounds")
  args = parser.parse_args(argv)
  rows = []
  for algo in ("fedavg", "fedgen"):
    for model in ("transformer", "lstm"):
      workload = Workload(algo=algo, model=model, dataset=args.dataset, data_dir=args.data_dir)
      result = profile(workload, args.rounds)
      rows.append((algo, model, result))
      top = "; ".join(f"{k} ({c}) {s * 1e3:.1f}" for k, c, s in result["top"])
      print(f"{algo} {model}: wall {result['wall_s'] * 1e3:.1f} ms; top kernels, ms: {top}")
  print(
    "\n| category | "
    + " | ".join(f"{a} {m}, ms (%)" for a, m, _ in rows)
    + " |\n|---|"
    + "---|" * len(rows)
  )
  for category in (*CATEGORIES, "sum of kernels", "wall time per round"):
    cells = []
    for _, _, r in rows:
      kernels = sum(r["categories"].values())
      if category == "sum of kernels":
        cells.append(f"{kernels * 1e3:.1f}")
      elif category == "wall time per round":
        cells.append(f"{r['wall_s'] * 1e3:.1f}")
      else:
        seconds = r["categories"].get(category, 0.0)
        cells.append(f"{seconds * 1e3:.1f} ({seconds / kernels:.0%})")
    print(f"| {category} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
