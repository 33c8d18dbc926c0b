#!/usr/bin/env python3
"""FedAvg round time three ways on the same clients: fedvp_jax's vmapped round, the same round
in Flower's simulation with fedvp_jax's JAX client (``fedvp_jax.flower``), and the PyTorch
Flower peer (``benchmarks/peer_flower.py``). One run each; prints a Markdown table.

Needs the flower extra, and torch for the peer (``pip install torch==2.13.0``, or
``--no-torch``)::

  python benchmarks/flower_round.py --rounds 4

What each column times:

* vmapped: ``benchmarks/round_time.py``'s ``time_rounds``: one jitted round of all 10 clients
  (evaluation on its schedule included), first call (compile) apart, median of the rest;
* Flower + JAX client: the wall time of each round at the server (``seconds`` of the records of
  :func:`fedvp_jax.flower.simulation.simulate`): sending, every client's jitted local round
  in a Ray actor (its evaluation included), replies, aggregation; the first round also pays
  each actor's JAX import and compilation;
* Flower + PyTorch: ``peer_flower.time_fedavg`` (no client evaluation, see its doc).

Both Flower runs use ``--cpus-per-client`` Ray CPUs per client actor (default 1: on 2 cores,
2 clients at a time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
from round_time import time_rounds

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="Synthetic-m10-h1")
  parser.add_argument("--data-dir")
  parser.add_argument("--model", default="transformer")
  parser.add_argument("--rounds", type=int, default=4, help="rounds per run (at least 2)")
  parser.add_argument("--cpus-per-client", type=float, default=1.0)
  parser.add_argument("--no-torch", action="store_true", help="leave the PyTorch peer out")
  args = parser.parse_args(argv)
  config = RunConfig.of(
    dataset=args.dataset,
    data_dir=args.data_dir,
    num_clients=10,
    model=args.model,
    algorithm="fedavg",
    rounds=args.rounds,
  )
  rows = []
  first, median = time_rounds(config, args.rounds - 1)
  rows.append(("fedvp_jax, vmapped round (jit)", first, median, None))

  from fedvp_jax.flower.simulation import simulate

  t0 = time.perf_counter()
  result = simulate(config, cpus_per_client=args.cpus_per_client)
  total = time.perf_counter() - t0
  seconds = [r["seconds"] for r in result.records]
  rows.append(
    ("Flower simulation, fedvp_jax JAX client", seconds[0], statistics.median(seconds[1:]), total)
  )
  if not args.no_torch:
    import peer_flower

    peer = peer_flower.time_fedavg(
      prepare(config).data, args.model, args.rounds, cpus_per_client=args.cpus_per_client
    )
    rows.append(
      (
        "Flower simulation, PyTorch client (peer)",
        peer["first_round_s"],
        peer["median_round_s"],
        peer["total_s"],
      )
    )
  import flwr

  print(
    f"FedAvg round time, {args.dataset}, {args.model}, 10 clients x {config.round.local_steps} "
    f"local steps x batch {config.round.batch_size}, {args.rounds} rounds, one run each; "
    f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"jax {jax.__version__}, flwr {flwr.__version__}, {args.cpus_per_client:g} CPU per client"
  )
  print()
  print("| | first round, s | median later round, s | whole run (Ray start/stop too), s |")
  print("|---|---|---|---|")
  for name, first_s, median_s, total_s in rows:
    shown = "" if total_s is None else f"{total_s:.1f}"
    print(f"| {name} | {first_s:.2f} | {median_s:.3f} | {shown} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
