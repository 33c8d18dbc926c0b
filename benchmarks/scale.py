#!/usr/bin/env python3
"""How throughput grows with the number of clients trained per round.

The dataset's viewers (Synthetic's 24 by default) are tiled up to N clients (the numbers,
not the data, matter here) and one FedAvg round, every client doing ``--local-steps`` steps of
batch 64, is timed for each N: client-steps per second, and device memory per client from the
compiled round's memory analysis (arguments + outputs + temporaries, divided by N). On a GPU
the peak bytes in use are reported too. Throughput should grow with N until the device is saturated.
The curve stops at the first N that runs out of device memory.

  python benchmarks/scale.py --clients 10,100,1000 --out BENCH_DIR
  python benchmarks/scale.py --clients 10,100,1000,10000 --device gpu --out BENCH_DIR
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import jax
import numpy as np
from workload import NO_EVALUATION, Workload, build, resolve_device


def tile_clients(data, num_clients: int):
  """``data`` with its clients repeated (cyclically) up to ``num_clients``."""
  index = np.arange(num_clients) % data.num_clients
  return jax.tree.map(lambda leaf: leaf[index], data)


def measure(workload: Workload, num_clients: int, repeats: int) -> dict[str, float]:
  """Compile time, median round time and memory of one FedAvg round of ``num_clients``."""
  built = build(workload)
  data = tile_clients(built.data, num_clients)
  state = jax.jit(built.algorithm.init)(jax.random.key(0), data)
  t0 = time.perf_counter()
  compiled = (
    jax.jit(built.algorithm.apply, donate_argnums=0).lower(state, data, jax.random.key(1)).compile()
  )
  compile_seconds = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  round_bytes = (
    memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    if memory is not None
    else float("nan")
  )
  state, _ = jax.block_until_ready(compiled(state, data, jax.random.key(2)))  # warm-up
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, data, jax.random.key(3 + r)))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "clients": num_clients,
    "compile_s": compile_seconds,
    "round_s": median,
    "client_steps_per_s": num_clients * workload.local_steps / median,
    "mib_per_client": round_bytes / num_clients / 2**20,
    "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
  }


def curve(workload: Workload, clients: list[int], repeats: int) -> list[dict[str, float]]:
  """``measure`` for each number of clients, up to the first that runs out of memory."""
  rows = []
  for n in clients:
    try:
      rows.append(measure(workload, n, repeats))
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      rows.append({"clients": n, "out_of_memory": True})
      break
  return rows


def table(rows: list[dict[str, float]]) -> list[str]:
  """The curve as Markdown table lines."""
  lines = [
    "| clients | compile, s | round, s | client-steps/s | MiB per client | peak GiB |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r.get("out_of_memory"):
      lines.append(f"| {r['clients']} | out of memory | | | | |")
      continue
    lines.append(
      f"| {r['clients']} | {r['compile_s']:.1f} | {r['round_s']:.3f} | "
      f"{r['client_steps_per_s']:.0f} | {r['mib_per_client']:.2f} | {r['peak_gib']:.2f} |"
    )
  return lines


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  clients = [r["clients"] for r in rows]
  ax.plot(clients, [r["client_steps_per_s"] for r in rows], marker="o")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("clients per round")
  ax.set_ylabel("client-steps per second")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clients", default="10,100,1000")
  parser.add_argument("--model", default="transformer")
  parser.add_argument("--local-steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--out", help="folder for scale.md and scale.png")
  args = parser.parse_args(argv)
  # Evaluation is not what scales here: time training and aggregation.
  workload = Workload(
    dataset="Synthetic-m10-h1",
    model=args.model,
    num_users=None,
    local_steps=args.local_steps,
    eval_every=NO_EVALUATION,
  )
  device = resolve_device(args.device)
  with jax.default_device(device):
    rows = curve(workload, [int(n) for n in args.clients.split(",")], args.repeats)
  head = (
    f"Scale: FedAvg, {args.model}, {args.local_steps} local steps of batch 64 per client; "
    f"{date.today()}, {device.platform} ({device.device_kind}), "
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}; median of "
    f"{args.repeats} rounds after a warm-up"
  )
  text = "\n".join([head, "", *table(rows)])
  print(text)
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(text + "\n")
    plot(
      [r for r in rows if not r.get("out_of_memory")],
      out / "scale.png",
      head.split(";", maxsplit=1)[0] + f"; {device.device_kind}",
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
