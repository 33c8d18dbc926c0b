#!/usr/bin/env python3
"""fedvp_jax against PyTorch on the same work, side by side in one process and on one device.

  python benchmarks/run.py --data-dir ../shared/data --out benchmarks/results/cpu.md
  python benchmarks/run.py --device gpu --out benchmarks/results/gpu.md
  python benchmarks/run.py --pfl-python /tmp/venv_pfl/bin/python \\
      --flower-python /tmp/venv_flwr/bin/python             # add the peer frameworks

PyTorch (the ``bench`` extra) is optional: without it the PyTorch rows are left out and
every fedvp_jax measurement still runs. ``--out-dir DIR`` writes one ``<section>.md`` per
section; ``--tiny`` shrinks every workload (Synthetic data, 2 clients, 2 local steps) so that
the script's whole path runs in seconds, for CI. Sections:

1. Rounds: FedAvg and FedGen (the researcher's configuration: 10 users of David-m10-h1, 10
   local steps of batch 64, 256 generated labels per step, grain 256, 50 generator steps) with
   the Transformer and the LSTM, for fedvp_jax, the seed-style PyTorch (``torch_seed.py``: the
   researcher's loops) and the optimised PyTorch (``torch_vmap.py``: ``torch.func.vmap``, also
   under ``torch.compile``, whose first round includes compiling, as fedvp_jax's does).
   The first round (fedvp_jax: tracing + compilation + one round) is reported apart from the
   median of the following rounds. Every implementation starts from the same initial params
   and reports its test loss afterwards, to show that they do the same learning. Rounds do
   not evaluate (fedvp_jax's first one does), so evaluation is not in the medians.
2. Peers (with ``--pfl-python`` / ``--flower-python``, each a Python with that framework
   installed): pfl-research and Flower on the FedAvg workload (``peer_pfl.py``,
   ``peer_flower.py``), in their own processes.
3. Heatmaps: 10 clients x 640 viewpoints at grain 256, sigma 5: fedvp_jax's jitted
   scatter-and-blur, the same in vectorised torch, and the per-viewpoint loop.
4. Arithmetic: FLOPs of one round and of its local training, counted with every loop
   iteration (``flops.py``; XLA's own count sees a loop body once), the device's measured f32
   matrix-multiply rate, and the fraction of it that local training reaches.
5. Scale (``--scale-clients 10,100,...``): ``scale.py``'s clients-per-round curve, stopping at
   the first size that runs out of memory.
6. End to end: ``--end-to-end R`` times R rounds of the full FedGen configuration with
   evaluation every round: loading, compilation and all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedvp_jax.heatmap import heatmaps as jax_heatmaps
from fedvp_jax.metrics import summarize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import flops  # noqa: E402
import scale  # noqa: E402
from workload import NO_EVALUATION, Workload, build, resolve_device  # noqa: E402

TORCH_VARIANTS = {
  "seed": ("PyTorch, seed-style", "torch_seed", {}),
  "vmap": ("PyTorch, torch.func.vmap", "torch_vmap", {}),
  "compile": ("PyTorch, vmap + torch.compile", "torch_vmap", {"compile": True}),
}
"""``--torch`` choices: the row's name, the module, ``make_federation``'s options."""


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
  """``(first_call_s, median_of_repeats_s, last_result)`` of ``fn`` (which synchronises)."""
  t0 = time.perf_counter()
  result = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times), result


def jax_rounds(workload: Workload, repeats: int) -> dict[str, Any]:
  """fedvp_jax: the jitted round, first call and median; test loss after the rounds."""
  built = build(workload)
  algorithm, data = built.algorithm, built.data
  state = jax.jit(algorithm.init)(jax.random.key(0), data)
  apply = jax.jit(algorithm.apply, donate_argnums=0)
  keys = iter(jax.random.split(jax.random.key(1), repeats + 1))

  def one_round():
    nonlocal state
    state, metrics = jax.block_until_ready(apply(state, data, next(keys)))
    return metrics

  first, median, _ = timed(one_round, repeats)
  loss = float(summarize(jax.jit(algorithm.evaluate)(state, data)).loss)
  return {"first_s": first, "median_s": median, "test_loss": loss}


def torch_rounds(module: Any, workload: Workload, repeats: int, **options: Any) -> dict[str, Any]:
  """A PyTorch implementation (``torch_seed`` or ``torch_vmap``) on the same data and start;
  ``options`` go to its ``make_federation`` (``compile=True``)."""
  built = build(workload)
  state = jax.jit(built.algorithm.init)(jax.random.key(0), built.data)
  clients = state.clients if hasattr(state, "clients") else state
  federation = module.make_federation(
    built.data,
    model=workload.model,
    algo=workload.algo,
    learning_rate=workload.learning_rate,
    local_steps=workload.local_steps,
    batch_size=workload.batch_size,
    eval_every=NO_EVALUATION,
    fedgen=workload.fedgen,
    init_params=jax.device_get(clients.server_params),
    generator_params=jax.device_get(getattr(state, "generator_params", None)),
    latent_dim=workload.latent_dim,
    **options,
  )
  first, median, _ = timed(federation.round, repeats)
  return {"first_s": first, "median_s": median, "test_loss": federation.evaluate()}


def rounds_section(
  base: Workload,
  pairs: list[tuple[str, str]],
  repeats: int,
  variants: list[str],
  log: Callable[[str], None],
) -> list[str]:
  """fedvp_jax and the chosen PyTorch ``variants`` (keys of TORCH_VARIANTS) on every round;
  speed-ups are against the last variant (the fastest PyTorch, ``compile``, by default)."""
  import importlib

  reference = TORCH_VARIANTS[variants[-1]][0] if variants else "fedvp_jax"
  lines = [
    "| algorithm | model | implementation | first round, s | median round, s | rounds/s "
    f"| {reference} / this | test loss after {repeats + 1} rounds |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for algo, model in pairs:
    workload = dataclasses.replace(base, algo=algo, model=model)
    results = {"fedvp_jax": jax_rounds(workload, repeats)}
    for variant in variants:
      name, module, options = TORCH_VARIANTS[variant]
      results[name] = torch_rounds(importlib.import_module(module), workload, repeats, **options)
    against = results[reference]["median_s"]
    for name, r in results.items():
      lines.append(
        f"| {algo} | {model} | {name} | {r['first_s']:.2f} | {r['median_s']:.3f} | "
        f"{1 / r['median_s']:.2f} | {against / r['median_s']:.2f}x | {r['test_loss']:.5f} |"
      )
      log(lines[-1])
  return lines


PEER_SNIPPET = """
import json, sys
sys.path.insert(0, {here!r})
import {module} as peer
from workload import Workload, build
data = build(Workload(dataset={dataset!r}, data_dir={data_dir!r}, model={model!r})).data
print("RESULT " + json.dumps(peer.time_fedavg(data, {model!r}, {rounds}, **{extra!r})))
"""


def peers_section(args: argparse.Namespace, log: Callable[[str], None]) -> list[str]:
  lines = [
    "| framework | model | version | first round, s | median round, s | rounds/s "
    "| final test MSE |",
    "|---|---|---|---|---|---|---|",
  ]
  peers = [
    ("pfl-research", args.pfl_python, "peer_pfl", {"torch_threads": args.torch_threads}),
    ("Flower", args.flower_python, "peer_flower", {}),
  ]
  for name, python, module, extra in peers:
    if not python:
      continue
    for model in ("transformer", "lstm"):
      code = PEER_SNIPPET.format(
        here=str(HERE),
        module=module,
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=model,
        rounds=args.repeats + 1,
        extra={k: v for k, v in extra.items() if v is not None},
      )
      done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, check=False, env=os.environ
      )
      result_line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
      if done.returncode or not result_line:
        lines.append(f"| {name} | {model} | failed: {done.stderr.strip()[-200:]} | | | | |")
      else:
        r = json.loads(result_line[-1].removeprefix("RESULT "))
        mse = r.get("final_test_mse")
        lines.append(
          f"| {name} | {model} | {r['version']} | {r['first_round_s']:.2f} | "
          f"{r['median_round_s']:.3f} | {1 / r['median_round_s']:.2f} | "
          f"{'' if mse is None else format(mse, '.5f')} |"
        )
      log(lines[-1])
  return lines


def heatmap_section(
  repeats: int, clients: int, points_per_client: int, with_torch: bool, log: Callable[[str], None]
) -> list[str]:
  grain, sigma = 256, 5.0
  points = np.random.default_rng(0).normal(size=(clients, points_per_client, 3))
  points = (points / np.linalg.norm(points, axis=-1, keepdims=True)).astype(np.float32)
  jitted = jax.jit(jax_heatmaps, static_argnums=(1,))
  device_points = jnp.asarray(points)
  candidates = {
    "fedvp_jax (jitted scatter + blur)": lambda: jax.block_until_ready(
      jitted(device_points, grain, sigma)
    ),
  }
  if with_torch:
    import torch
    import torch_seed
    import torch_vmap

    torch_points = torch.from_numpy(points).to(torch.get_default_device())
    sync = torch.cuda.synchronize if torch_points.is_cuda else lambda: None
    candidates["PyTorch, vectorised scatter + blur"] = lambda: (
      torch_vmap.heatmaps(torch_points, grain, sigma),
      sync(),
    )
    candidates["PyTorch, one viewpoint at a time"] = lambda: (
      torch_seed.heatmaps(torch_points, grain, sigma),
      sync(),
    )
  lines = ["| implementation | first call, ms | median, ms | vs fedvp_jax |", "|---|---|---|---|"]
  results = {}
  for name, fn in candidates.items():
    slow = "viewpoint at a time" in name
    results[name] = timed(fn, 1 if slow else repeats)[:2]
  ours = results["fedvp_jax (jitted scatter + blur)"][1]
  for name, (first, median) in results.items():
    lines.append(f"| {name} | {first * 1e3:.1f} | {median * 1e3:.2f} | {median / ours:.2f}x |")
    log(lines[-1])
  return lines


def matmul_rate(device: jax.Device, repeats: int) -> float:
  """Measured f32 FLOP/s of a large jitted matrix multiply (the device's practical peak)."""
  n = 8192 if device.platform == "gpu" else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  product = jax.jit(lambda x: x @ x)
  _, median, _ = timed(lambda: jax.block_until_ready(product(a)), repeats)
  return 2 * n**3 / median


def arithmetic_section(
  base: Workload,
  pairs: list[tuple[str, str]],
  device: jax.Device,
  repeats: int,
  log: Callable[[str], None],
) -> list[str]:
  rate = matmul_rate(device, repeats)
  lines = [
    f"Measured f32 matrix-multiply rate: {rate / 1e9:.1f} GFLOP/s "
    f"({'8192' if device.platform == 'gpu' else '2048'}^2 matmul, median of {repeats}).",
    "",
    "GFLOP per round: every loop iteration counted (HLO x trip counts), the cheaper and the "
    "dearer branch of each conditional (the evaluation's); XLA's own count sees each loop body "
    "once. Local training (the plain loss, all clients at once): analytic matmul FLOPs from the "
    "model's shapes, HLO matmul and all FLOPs x trip counts, and XLA's count of one loop-free "
    "step times the steps.",
    "",
    "| algorithm | model | GFLOP per round | XLA's count (loop once) | local: analytic matmul "
    "| local: HLO matmul / all | local: one step x steps | local ms | GFLOP/s | of matmul rate |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for algo, model in pairs:
    built = build(dataclasses.replace(base, algo=algo, model=model))
    state = jax.jit(built.algorithm.init)(jax.random.key(0), built.data)
    round_hlo = jax.jit(built.algorithm.apply).lower(state, built.data, jax.random.key(1)).compile()
    low, high = (flops.hlo_flops(round_hlo.as_text(), b).total / 1e9 for b in ("min", "max"))
    local = flops.local_training_flops(built, base.local_steps, base.batch_size)
    _, seconds, _ = timed(
      lambda c=local["compiled"], i=local["inputs"]: jax.block_until_ready(
        c(*i, jax.random.key(3), None)
      ),
      repeats,
    )
    achieved = local["hlo"].dot / seconds
    lines.append(
      f"| {algo} | {model} | {low:.2f} to {high:.2f} | {flops.xla_flops(round_hlo) / 1e9:.2f} "
      f"| {local['analytic']:.2f} "
      f"| {local['hlo'].dot / 1e9:.2f} / {local['hlo'].total / 1e9:.2f} "
      f"| {local['single_xla']:.2f} | {seconds * 1e3:.1f} | {achieved / 1e9:.1f} "
      f"| {achieved / rate:.1%} |"
    )
    log(lines[-1])
  return lines


def scale_section(
  base: Workload, clients: list[int], repeats: int, log: Callable[[str], None]
) -> list[str]:
  rows = scale.curve(base, clients, repeats)
  lines = scale.table(rows)
  for line in lines[2:]:
    log(line)
  return lines


def end_to_end_section(base: Workload, rounds: int, log: Callable[[str], None]) -> list[str]:
  """``rounds`` FedGen rounds with evaluation every round, from loading the data on."""
  workload = dataclasses.replace(base, algo="fedgen", eval_every=1)
  t0 = time.perf_counter()
  built = build(workload)
  state = jax.jit(built.algorithm.init)(jax.random.key(0), built.data)
  apply = jax.jit(built.algorithm.apply, donate_argnums=0)
  keys = jax.random.split(jax.random.key(1), rounds)
  times = []
  for r in range(rounds):
    t1 = time.perf_counter()
    state, metrics = jax.block_until_ready(apply(state, built.data, keys[r]))
    times.append(time.perf_counter() - t1)
  total = time.perf_counter() - t0
  loss = float(summarize(metrics.test).loss)
  line = (
    f"FedGen, {workload.model}, {workload.dataset}, {workload.num_users} users, {rounds} rounds "
    f"with evaluation every round (data loading, compilation and all): **{total:.1f} s** (first "
    f"round {times[0]:.1f} s, then median {statistics.median(times[1:] or times) * 1e3:.1f} "
    f"ms/round); last round's test loss {loss:.5f}."
  )
  log(line)
  return [line]


def tiny(workload: Workload) -> Workload:
  """A workload small enough to run every section in seconds (CI); the LSTM compiles faster."""
  fedgen = dataclasses.replace(workload.fedgen, gen_steps=2, gen_batch_size=8, grain=32)
  return dataclasses.replace(
    workload,
    dataset="Synthetic-m10-h1",
    model="lstm",
    num_users=2,
    local_steps=2,
    batch_size=8,
    fedgen=fedgen,
  )


def setup_torch(device: jax.Device, threads: int | None) -> str | None:
  """Puts PyTorch on ``device``'s kind with ``threads``; describes it, or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  torch_device = "cuda" if device.platform == "gpu" else "cpu"
  torch.set_default_device(torch_device)
  if threads:
    torch.set_num_threads(threads)
  return f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch_device})"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--dataset", default="David-m10-h1")
  parser.add_argument("--data-dir", help="data root (default: $FEDVP_DATA)")
  parser.add_argument("--device", default="cpu", help="cpu or gpu (fedvp_jax and PyTorch)")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the first")
  parser.add_argument("--sections", default="rounds,peers,heatmaps,arithmetic")
  parser.add_argument("--algos", default="fedavg,fedgen")
  parser.add_argument("--models", default="transformer,lstm")
  parser.add_argument("--torch", default="seed,vmap,compile", help="PyTorch variants to run")
  parser.add_argument("--scale-clients", default="", help="e.g. 10,100,1000,10000")
  parser.add_argument("--end-to-end", type=int, default=0, help="R rounds end to end; 0: skip")
  parser.add_argument("--pfl-python", help="a Python with pfl installed")
  parser.add_argument("--flower-python", help='a Python with "flwr[simulation]" installed')
  parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for PyTorch")
  parser.add_argument("--tiny", action="store_true", help="tiny workloads (CI)")
  parser.add_argument("--out", help="also write the tables to this Markdown file")
  parser.add_argument("--out-dir", help="also write each section to DIR/<section>.md")
  args = parser.parse_args(argv)
  device = resolve_device(args.device)
  torch_note = setup_torch(device, args.torch_threads)
  has_torch = torch_note is not None
  variants = [v for v in args.torch.split(",") if v] if has_torch else []
  base = Workload(dataset=args.dataset, data_dir=args.data_dir)
  if args.tiny:
    base = tiny(base)
  sections = args.sections.split(",")
  pairs = [(a, m) for a in args.algos.split(",") for m in args.models.split(",")]
  header = (
    f"{date.today()}; {device.platform} ({device.device_kind}); host "
    f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores; jax "
    f"{jax.__version__}, {torch_note or 'torch not installed'}; {base.dataset}, "
    f"{base.num_users} clients; medians of {args.repeats} rounds or calls after the first."
  )
  out = [f"# Benchmark: {header}", ""]
  tables: dict[str, list[str]] = {}
  heat_clients, heat_points = (2, 16) if args.tiny else (10, 640)
  with jax.default_device(device):
    if "rounds" in sections:
      tables["rounds"] = rounds_section(base, pairs, args.repeats, variants, print)
    if "peers" in sections and (args.pfl_python or args.flower_python):
      tables["peers"] = peers_section(args, print)
    if "heatmaps" in sections:
      tables["heatmaps"] = heatmap_section(
        args.repeats, heat_clients, heat_points, has_torch, print
      )
    if "arithmetic" in sections:
      tables["arithmetic"] = arithmetic_section(base, pairs, device, args.repeats, print)
    if args.scale_clients:
      clients = [int(n) for n in args.scale_clients.split(",")]
      tables["scale"] = scale_section(base, clients, max(1, args.repeats // 2), print)
    if args.end_to_end:
      tables["end-to-end"] = end_to_end_section(base, args.end_to_end, print)
  titles = {
    "rounds": "Rounds",
    "peers": "Peer frameworks, FedAvg",
    "heatmaps": f"Heatmaps, {heat_clients} x {heat_points} viewpoints, grain 256",
    "arithmetic": "Arithmetic",
    "scale": f"Scale: clients per round, FedAvg, {base.model}",
    "end-to-end": "End to end",
  }
  for name, lines in tables.items():
    out += [f"## {titles[name]}", "", *lines, ""]
    if args.out_dir:
      Path(args.out_dir).mkdir(parents=True, exist_ok=True)
      section = [f"# {titles[name]}", "", header, "", *lines, ""]
      (Path(args.out_dir) / f"{name}.md").write_text("\n".join(section))
  text = "\n".join(out)
  print("\n" + text)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
