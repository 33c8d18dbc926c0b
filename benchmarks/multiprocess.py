#!/usr/bin/env python3
"""The cost of several processes: one FedAvg round split over 2 processes × 1 CPU device
(gloo collectives between processes on 127.0.0.1) against 1 process × 2 devices (in-process
collectives), side by side in one invocation, and each process's peak memory as clients grow.

Every configuration runs as fresh processes through the library (``distributed.start``,
``prepare``, ``iterate_rounds``): ``--rounds`` rounds, the first (compile) dropped, the median
of the rest reported, and the peak resident memory (``ru_maxrss``) of every process.

  python benchmarks/multiprocess.py --dataset David-m10-h1 --clients 8,24,48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import date

WORKER = r"""
import json, resource, statistics, sys, time
import jax
from fedvp_jax import distributed
from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare
from fedvp_jax.rounds import iterate_rounds

dataset, clients, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 4:
  distributed.start(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
config = RunConfig.of(
  algorithm="fedavg", dataset=dataset, model="lstm", num_clients=clients, eval_every=1000,
  devices=len(jax.devices()),
)
experiment = prepare(config)
times, start = [], time.perf_counter()
for state, metrics in iterate_rounds(
  experiment.algorithm, experiment.data, [0], rounds, experiment.mesh
):
  jax.block_until_ready(metrics)
  times.append(time.perf_counter() - start)
  start = time.perf_counter()
distributed.finish()
print("REPORT " + json.dumps({
  "median_s": statistics.median(times[1:]),
  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(processes: int, devices_each: int, dataset: str, clients: int, rounds: int) -> list[dict]:
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
    "JAX_PLATFORMS": "cpu",
  }
  port = free_port()
  job = []
  for p in range(processes):
    extra = [] if processes == 1 else [f"127.0.0.1:{port}", str(processes), str(p)]
    command = [sys.executable, "-c", WORKER, dataset, str(clients), str(rounds), *extra]
    job.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
  reports = []
  for process in job:
    out, _ = process.communicate(timeout=1800)
    if process.returncode:
      raise SystemExit(f"a process exited with {process.returncode}")
    line = next(x for x in out.splitlines() if x.startswith("REPORT "))
    reports.append(json.loads(line.removeprefix("REPORT ")))
  return reports


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="David-m10-h1")
  parser.add_argument("--clients", default="8,24,48", help="comma-separated client counts")
  parser.add_argument("--rounds", type=int, default=12)
  args = parser.parse_args()
  print(f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
  print(f"FedAvg, LSTM, {args.dataset}, {args.rounds} rounds (first dropped), no evaluation\n")
  print("| clients | layout | median round (s) | peak memory per process (MB) |")
  print("|---|---|---|---|")
  for clients in (int(c) for c in args.clients.split(",")):
    for processes, devices_each in ((1, 2), (2, 1)):
      reports = run(processes, devices_each, args.dataset, clients, args.rounds)
      median = max(r["median_s"] for r in reports)
      memory = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in reports)
      processes_word = "process" if processes == 1 else "processes"
      devices_word = "device" if devices_each == 1 else "devices"
      layout = f"{processes} {processes_word} × {devices_each} {devices_word}"
      print(f"| {clients} | {layout} | {median:.3f} | {memory} |", flush=True)


if __name__ == "__main__":
  main()
