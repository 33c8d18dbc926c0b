#!/usr/bin/env python3
"""How throughput grows with the number of clients trained per round.

The Synthetic dataset's 24 viewers are tiled up to N clients (the numbers, not the data,
matter here) and one FedAvg round, every client doing ``--local-steps`` steps of batch 64, is
timed for each N: client-steps per second, and device memory per client from the compiled
round's memory analysis (arguments + outputs + temporaries, divided by N). On a GPU the peak
bytes in use are reported too. Throughput should grow with N until the device is saturated.

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

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare


def tile_clients(data, num_clients: int):
  """``data`` with its clients repeated (cyclically) up to ``num_clients``."""
  index = np.arange(num_clients) % data.num_clients
  return jax.tree.map(lambda leaf: leaf[index], data)


def measure(config: RunConfig, num_clients: int, repeats: int) -> dict[str, float]:
  """Compile time, median round time and memory of one FedAvg round of ``num_clients``."""
  experiment = prepare(config)
  data = tile_clients(experiment.data, num_clients)
  state = jax.jit(experiment.algorithm.init)(jax.random.key(0), data)
  t0 = time.perf_counter()
  compiled = (
    jax.jit(experiment.algorithm.apply, donate_argnums=0)
    .lower(state, data, jax.random.key(1))
    .compile()
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
    "client_steps_per_s": num_clients * config.round.local_steps / median,
    "mib_per_client": round_bytes / num_clients / 2**20,
    "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
  }


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
  config = RunConfig.of(
    dataset="Synthetic-m10-h1",
    model=args.model,
    num_clients=None,
    local_steps=args.local_steps,
    eval_every=10**6,  # time training and aggregation; evaluation is not what scales here
  )
  device = jax.devices("gpu" if args.device in ("gpu", "cuda") else "cpu")[0]
  with jax.default_device(device):
    rows = [measure(config, int(n), args.repeats) for n in args.clients.split(",")]
  head = (
    f"Scale: FedAvg, {args.model}, {args.local_steps} local steps of batch 64 per client; "
    f"{date.today()}, {device.platform} ({device.device_kind}), "
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}; median of "
    f"{args.repeats} rounds after a warm-up"
  )
  lines = [
    head,
    "",
    "| clients | compile, s | round, s | client-steps/s | MiB per client | peak GiB |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['clients']} | {r['compile_s']:.1f} | {r['round_s']:.3f} | "
      f"{r['client_steps_per_s']:.0f} | {r['mib_per_client']:.2f} | {r['peak_gib']:.2f} |"
    )
  table = "\n".join(lines)
  print(table)
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(table + "\n")
    plot(rows, out / "scale.png", head.split(";", maxsplit=1)[0] + f"; {device.device_kind}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
