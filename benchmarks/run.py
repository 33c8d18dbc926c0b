#!/usr/bin/env python3
"""fedvp_jax against PyTorch on the same work, side by side in one process and on one device.

  python benchmarks/run.py --data-dir ../shared/data --out benchmarks/results/cpu.md
  python benchmarks/run.py --device gpu --out benchmarks/results/gpu.md
  python benchmarks/run.py --pfl-python /tmp/venv_pfl/bin/python \\
      --flower-python /tmp/venv_flwr/bin/python             # add the peer frameworks

Needs the ``bench`` extra (torch). Sections:

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
4. Arithmetic: FLOPs of one round and of its local training (XLA's cost analysis), the
   device's measured f32 matrix-multiply rate, and the fraction of it that local training
   reaches.
5. End to end: ``--end-to-end R`` times R rounds of the full FedGen configuration through
   ``fedvp_jax.rounds.train`` (the script's path: compilation, evaluation every round,
   metrics), as ``scripts/train.py`` runs them.
"""

from __future__ import annotations

import argparse
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

from fedvp_jax.algorithms import local_update, prediction_loss
from fedvp_jax.algorithms.client import stack
from fedvp_jax.config import RunConfig
from fedvp_jax.data.federated import sample_batches
from fedvp_jax.experiment import prepare
from fedvp_jax.heatmap import heatmaps as jax_heatmaps
from fedvp_jax.metrics import summarize
from fedvp_jax.models import build_model
from fedvp_jax.rounds import train
from fedvp_jax.runner import drain

HERE = Path(__file__).resolve().parent
NO_EVALUATION = 10**6  # eval_every: only round 0 evaluates


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


def jax_rounds(config: RunConfig, repeats: int) -> dict[str, Any]:
  """fedvp_jax: the jitted round, first call and median; test loss after the rounds."""
  experiment = prepare(config)
  algorithm, data = experiment.algorithm, experiment.data
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


def torch_rounds(module: Any, config: RunConfig, repeats: int, **options: Any) -> dict[str, Any]:
  """A PyTorch implementation (``torch_seed`` or ``torch_vmap``) on the same data and start;
  ``options`` go to its ``make_federation`` (``compile=True``)."""
  experiment = prepare(config)
  state = jax.jit(experiment.algorithm.init)(jax.random.key(0), experiment.data)
  clients = state.clients if hasattr(state, "clients") else state
  federation = module.make_federation(
    experiment.data,
    model=config.model,
    algo="fedgen" if config.algorithm == "fedgen" else "fedavg",
    learning_rate=config.learning_rate,
    local_steps=config.round.local_steps,
    batch_size=config.round.batch_size,
    eval_every=NO_EVALUATION,
    fedgen=config.fedgen,
    init_params=jax.device_get(clients.server_params),
    generator_params=jax.device_get(getattr(state, "generator_params", None)),
    latent_dim=config.latent_dim,
    **options,
  )
  first, median, _ = timed(federation.round, repeats)
  return {"first_s": first, "median_s": median, "test_loss": federation.evaluate()}


def rounds_section(base: RunConfig, repeats: int, log: Callable[[str], None]) -> list[str]:
  import torch_seed
  import torch_vmap

  lines = [
    "| algorithm | model | implementation | first round, s | median round, s | rounds/s "
    f"| vs seed-style | test loss after {repeats + 1} rounds |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for algo in ("fedavg", "fedgen"):
    for model in ("transformer", "lstm"):
      config = base.replace(algorithm=algo, model=model)
      results = {
        "fedvp_jax": jax_rounds(config, repeats),
        "PyTorch, seed-style": torch_rounds(torch_seed, config, repeats),
        "PyTorch, torch.func.vmap": torch_rounds(torch_vmap, config, repeats),
        "PyTorch, vmap + torch.compile": torch_rounds(torch_vmap, config, repeats, compile=True),
      }
      seed = results["PyTorch, seed-style"]["median_s"]
      for name, r in results.items():
        lines.append(
          f"| {algo} | {model} | {name} | {r['first_s']:.2f} | {r['median_s']:.3f} | "
          f"{1 / r['median_s']:.2f} | {seed / r['median_s']:.1f}x | {r['test_loss']:.5f} |"
        )
        log(lines[-1])
  return lines


PEER_SNIPPET = """
import json, sys
sys.path.insert(0, {here!r})
import {module} as peer
from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare
data = prepare(RunConfig.of(dataset={dataset!r}, data_dir={data_dir!r}, num_clients=10,
                         model={model!r})).data
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


def heatmap_section(repeats: int, log: Callable[[str], None]) -> list[str]:
  import torch
  import torch_seed
  import torch_vmap

  grain, sigma = 256, 5.0
  points = np.random.default_rng(0).normal(size=(10, 640, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  jitted = jax.jit(jax_heatmaps, static_argnums=(1,))
  device_points = jnp.asarray(points)
  torch_points = torch.from_numpy(points)
  candidates = {
    "fedvp_jax (jitted scatter + blur)": lambda: jax.block_until_ready(
      jitted(device_points, grain, sigma)
    ),
    "PyTorch, vectorised scatter + blur": lambda: torch_vmap.heatmaps(torch_points, grain, sigma),
    "PyTorch, one viewpoint at a time": lambda: torch_seed.heatmaps(torch_points, grain, sigma),
  }
  lines = [
    "| implementation | first call, ms | median, ms | vs per-viewpoint |",
    "|---|---|---|---|",
  ]
  results = {}
  for name, fn in candidates.items():
    slow = "viewpoint at a time" in name
    results[name] = timed(fn, 1 if slow else repeats)[:2]
  loop = results["PyTorch, one viewpoint at a time"][1]
  for name, (first, median) in results.items():
    lines.append(f"| {name} | {first * 1e3:.1f} | {median * 1e3:.2f} | {loop / median:.0f}x |")
    log(lines[-1])
  return lines


def matmul_rate(device: jax.Device, repeats: int) -> float:
  """Measured f32 FLOP/s of a large jitted matrix multiply (the device's practical peak)."""
  n = 8192 if device.platform == "gpu" else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  product = jax.jit(lambda x: x @ x)
  _, median, _ = timed(lambda: jax.block_until_ready(product(a)), repeats)
  return 2 * n**3 / median


def _flops(compiled: Any) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def arithmetic_section(
  base: RunConfig, device: jax.Device, repeats: int, log: Callable[[str], None]
) -> list[str]:
  rate = matmul_rate(device, repeats)
  lines = [
    f"Measured f32 matrix-multiply rate: {rate / 1e9:.1f} GFLOP/s "
    f"({'8192' if device.platform == 'gpu' else '2048'}^2 matmul, median of {repeats}).",
    "",
    "| algorithm | model | GFLOP per round | local training: GFLOP | local training: ms "
    "| GFLOP/s | fraction of matmul rate |",
    "|---|---|---|---|---|---|---|",
  ]
  for algo in ("fedavg", "fedgen"):
    for model in ("transformer", "lstm"):
      config = base.replace(algorithm=algo, model=model)
      experiment = prepare(config)
      algorithm, data = experiment.algorithm, experiment.data
      state = jax.jit(algorithm.init)(jax.random.key(0), data)
      round_flops = _flops(jax.jit(algorithm.apply).lower(state, data, jax.random.key(1)).compile())
      # Local training alone: the plain loss (FedGen's generator term is part of its round).
      spec = experiment.spec
      net = build_model(model, spec.history, spec.horizon, latent_dim=config.latent_dim)
      optimizer = config.make_optimizer()
      params = stack(net.init(jax.random.key(0)), data.num_clients)
      opt_state = jax.vmap(optimizer.init)(params)
      batches = sample_batches(
        jax.random.key(2), data, config.round.local_steps, config.round.batch_size
      )
      train_local = jax.jit(local_update(prediction_loss(net), optimizer))
      compiled = train_local.lower(params, opt_state, batches, jax.random.key(3), None).compile()
      local_flops = _flops(compiled)
      _, seconds, _ = timed(
        lambda c=compiled, p=params, o=opt_state, b=batches: jax.block_until_ready(
          c(p, o, b, jax.random.key(3), None)
        ),
        repeats,
      )
      achieved = local_flops / seconds
      lines.append(
        f"| {algo} | {model} | {round_flops / 1e9:.2f} | {local_flops / 1e9:.2f} | "
        f"{seconds * 1e3:.1f} | {achieved / 1e9:.1f} | {achieved / rate:.1%} |"
      )
      log(lines[-1])
  return lines


def end_to_end_section(base: RunConfig, rounds: int, log: Callable[[str], None]) -> list[str]:
  config = base.replace(algorithm="fedgen", model="transformer", rounds=rounds)
  t0 = time.perf_counter()
  experiment = prepare(config)
  (summary,) = drain(train(experiment, [0]))
  total = time.perf_counter() - t0
  line = (
    f"FedGen, Transformer, full configuration, {rounds} rounds with evaluation every round, "
    f"through `fedvp_jax.rounds.train` (data loading, compilation and all): **{total:.1f} s** "
    f"(first round {summary['first_round_seconds']:.1f} s, then median "
    f"{summary['median_round_seconds'] * 1e3:.1f} ms/round); final Average Global Loss "
    f"{summary['final']['loss']:.5f}."
  )
  log(line)
  return [line]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--dataset", default="David-m10-h1")
  parser.add_argument("--data-dir", help="data root (default: $FEDVP_DATA)")
  parser.add_argument("--device", default="cpu", help="cpu or gpu (fedvp_jax and PyTorch)")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the first")
  parser.add_argument("--sections", default="rounds,peers,heatmaps,arithmetic")
  parser.add_argument("--end-to-end", type=int, default=0, help="R rounds end to end; 0: skip")
  parser.add_argument("--pfl-python", help="a Python with pfl installed")
  parser.add_argument("--flower-python", help='a Python with "flwr[simulation]" installed')
  parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for PyTorch")
  parser.add_argument("--out", help="also write the tables to this Markdown file")
  args = parser.parse_args(argv)
  sys.path.insert(0, str(HERE))
  import torch

  device = jax.devices("gpu" if args.device in ("gpu", "cuda") else "cpu")[0]
  torch_device = "cuda" if device.platform == "gpu" else "cpu"
  torch.set_default_device(torch_device)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  base = RunConfig.of(
    dataset=args.dataset, data_dir=args.data_dir, num_clients=10, eval_every=NO_EVALUATION
  )
  sections = args.sections.split(",")
  header = (
    f"{date.today()}; {device.platform} ({device.device_kind}); host "
    f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores; jax "
    f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
    f"{torch_device}); {args.dataset}, 10 clients; medians of {args.repeats} rounds or calls "
    "after the first."
  )
  out = [f"# Benchmark: {header}", ""]
  with jax.default_device(device):
    if "rounds" in sections:
      out += ["## Rounds", "", *rounds_section(base, args.repeats, print), ""]
    if "peers" in sections and (args.pfl_python or args.flower_python):
      out += ["## Peer frameworks, FedAvg", "", *peers_section(args, print), ""]
    if "heatmaps" in sections:
      out += ["## Heatmaps, 10 x 640 viewpoints, grain 256", ""]
      out += [*heatmap_section(args.repeats, print), ""]
    if "arithmetic" in sections:
      out += ["## Arithmetic", "", *arithmetic_section(base, device, args.repeats, print), ""]
    if args.end_to_end:
      full = base.replace(eval_every=1)
      out += ["## End to end", "", *end_to_end_section(full, args.end_to_end, print), ""]
  text = "\n".join(out)
  print("\n" + text)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
