#!/usr/bin/env python3
"""Times one federated round of each algorithm and model, side by side in one process.

For every (algorithm, model) it reports the first call (tracing + compilation + one round)
and the median of ``--repeats`` further rounds, each synchronised with
``jax.block_until_ready``. Prints a Markdown table and, with ``--out``, writes it to a file.

  python benchmarks/round_time.py --dataset David-m10-h1 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date

import jax

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare


def time_rounds(config: RunConfig, repeats: int) -> tuple[float, float]:
  """``(first_call_seconds, median_round_seconds)`` of ``config``'s round function."""
  experiment = prepare(config)
  state = jax.jit(experiment.algorithm.init)(jax.random.key(0), experiment.data)
  apply = jax.jit(experiment.algorithm.apply)
  t0 = time.perf_counter()
  state, _ = jax.block_until_ready(apply(state, experiment.data, jax.random.key(1)))
  first = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(apply(state, experiment.data, jax.random.key(2 + r)))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="Synthetic-m10-h1")
  parser.add_argument("--data-dir")
  parser.add_argument("--algos", default="fedavg,fedgen")
  parser.add_argument("--models", default="transformer,lstm")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", help="also write the table to this file")
  args = parser.parse_args(argv)
  base = RunConfig.of(dataset=args.dataset, data_dir=args.data_dir, num_clients=10)
  device = jax.devices()[0]
  lines = [
    f"Round time, {args.dataset}, 10 clients x 10 local steps x batch 64 (FedGen: 256 generated "
    f"labels per step, grain 256, 50 generator steps); {date.today()}, {device.platform} "
    f"({device.device_kind}), {platform.processor() or platform.machine()}, "
    f"jax {jax.__version__}; median of {args.repeats} rounds",
    "",
    "| algorithm | model | first call (compile + 1 round), s | median round, s | rounds/s |",
    "|---|---|---|---|---|",
  ]
  for algo in args.algos.split(","):
    for model in args.models.split(","):
      first, median = time_rounds(base.replace(algorithm=algo, model=model), args.repeats)
      lines.append(f"| {algo} | {model} | {first:.2f} | {median:.3f} | {1 / median:.2f} |")
      print(lines[-1], flush=True)
  table = "\n".join(lines)
  print("\n" + table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
