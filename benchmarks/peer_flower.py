"""FedAvg round time in Flower's simulation (Ray backend, PyTorch clients) on fedvp_jax's
FedAvg workload.

Install, in a virtual environment of its own, with torch 2.13.0 (the CPU build on this
machine's disk) installed first, since a bare ``torch`` requirement would download a CUDA
build (``flwr`` itself does not depend on torch)::

  python -m venv --system-site-packages /tmp/venv_flwr     # sees jax, flax and fedvp_jax
  /tmp/venv_flwr/bin/pip install torch==2.13.0
  /tmp/venv_flwr/bin/pip install "flwr[simulation]"

Tested with flwr 1.42.0 (its ``simulation`` extra pins ray 2.55.1), torch 2.13.0+cpu, Python
3.11.7; ``pip check`` finds no conflict.

What is measured: the same FedAvg workload as ``benchmarks/round_time.py --algos fedavg``: 10
clients (the users ``prepare(RunConfig.of(num_clients=10))`` draws) as 10 virtual SuperNodes, all
of them in every round (``FedAvg(fraction_train=1.0, min_train_nodes=10)``, the message-API
strategy of ``flwr.serverapp.strategy``), each running a ``ClientApp`` that does 10 SGD steps
(lr 0.01) of batch 64 on its own windows and replies with its weights and its number of
training windows (``num-examples``), by which FedAvg weights the average. Client-side
federated evaluation is off (``fraction_evaluate=0``). The models are
``benchmarks/torch_models.py``'s PyTorch twins of fedvp_jax's (PyTorch's fused kernels),
starting from the same parameters as a fedvp_jax run with the same seed; after 8 rounds the
final test MSE agrees with fedvp_jax's to 3 significant digits (transformer 0.002717 vs
0.0027158, lstm 0.002767 vs 0.0027674). Per-round wall time is read at the
strategy's ``evaluate_fn``, which Flower calls before the first round and after each one (it
only records the time); the first round is reported apart and the median is over the others.

Differences from fedvp_jax's round:

* fedvp_jax's round also evaluates every client's deployed model on its test windows
  (``eval_every=1``); Flower's rounds here do not (in Flower's favour). ``eval_s`` reports
  what one such evaluation (every client's test windows, one forward pass, in the driver)
  costs in PyTorch.
* Flower runs clients in Ray actors, ``cpus_per_client`` CPUs each (default 1, so on this
  2-core machine 2 clients train at once with one torch thread each); each client's call
  crosses process boundaries (the weights go out and back as Flower ``ArrayRecord`` messages,
  serialised through Ray), which is Flower's architecture, not something added here. The
  first round also pays for starting Ray and its actors (their imports included): Flower
  sends the first messages while the actor pool is still starting.
* ``run_simulation`` (the in-process Python API used here) is deprecated in flwr 1.42 in
  favour of ``flwr run`` on a Flower app project; both drive the same simulation engine.
* Each client's data is read once per actor process from a ``.npz`` written by the driver
  and cached (like Flower's examples cache their dataset partitions); minibatches walk a fresh
  random permutation of the client's windows, wrapping around, as fedvp_jax's sampler does,
  seeded by (seed, client, round) so they do not depend on which actor runs a client.

Run it through the side-by-side benchmark, which prepares the same clients and prints the table
beside fedvp_jax's (from the repository root)::

  python benchmarks/run.py --sections peers --flower-python /tmp/venv_flwr/bin/python
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# torch_models beside this file; the repository root for `benchmarks.peer_flower`. Ray's
# workers get the driver's sys.path, so the client functions below are found by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from peer_common import client_arrays, initial_torch_model, test_mse

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a warning

_CACHE: dict[Any, Any] = {}
"""Per-process cache (in every Ray actor) of client data and built networks."""


def _client_windows(path: str, partition: int) -> tuple[np.ndarray, np.ndarray]:
  key = ("data", path, partition)
  if key not in _CACHE:
    with np.load(path) as f:
      _CACHE[key] = (f[f"x{partition}"], f[f"y{partition}"])
  return _CACHE[key]


def _client_net(name: str, history: int, horizon: int) -> Any:
  key = ("net", name, history, horizon)
  if key not in _CACHE:
    import torch_models

    _CACHE[key] = torch_models.build_torch_model(name, history, horizon)
  return _CACHE[key]


def client_train(msg: Any, context: Any) -> Any:
  """The ClientApp's train function: local SGD from the received weights, then reply."""
  import torch
  import torch_models
  from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

  config = msg.content["config"]
  partition = int(context.node_config["partition-id"])
  x, y = _client_windows(str(config["data"]), partition)
  net = _client_net(str(config["model"]), x.shape[1], y.shape[1])
  net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
  net.train()
  steps, batch = int(config["local-steps"]), int(config["batch-size"])
  optimizer = torch.optim.SGD(net.parameters(), lr=float(config["lr"]))
  rng = np.random.default_rng([int(config["seed"]), partition, int(config["server-round"])])
  flat = rng.permutation(len(x))[np.arange(steps * batch) % len(x)]
  loss = torch.zeros(())
  for step in range(steps):
    idx = flat[step * batch : (step + 1) * batch]
    optimizer.zero_grad()
    loss = torch_models.mse(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
    loss.backward()
    optimizer.step()
  metrics = {
    "train_loss": float(loss),
    "num-examples": len(x),
    "torch-threads": torch.get_num_threads(),
  }
  content = RecordDict(
    {"arrays": ArrayRecord(torch_state_dict=net.state_dict()), "metrics": MetricRecord(metrics)}
  )
  return Message(content=content, reply_to=msg)


def time_fedavg(
  client_data: Any,
  model: str,
  rounds: int,
  *,
  local_steps: int = 10,
  batch_size: int = 64,
  learning_rate: float = 0.01,
  seed: int = 0,
  cpus_per_client: float = 1,
) -> dict[str, Any]:
  """Runs ``rounds`` FedAvg rounds of ``model`` in Flower's simulation and times each.

  Args:
    client_data: a :class:`fedvp_jax.data.federated.ClientData` (for example
      ``prepare(config).data``); client i is SuperNode i with its real windows.
    model: ``"transformer"`` or ``"lstm"``.
    rounds: rounds (at least 2: the first is reported apart).
    local_steps: SGD steps per client per round.
    batch_size: windows per step.
    learning_rate: the clients' SGD learning rate.
    seed: seeds the initial model (as fedvp_jax's) and the minibatches.
    cpus_per_client: Ray CPUs per client actor (the machine's CPUs over this run at once).

  Returns:
    ``first_round_s``, ``median_round_s`` (over rounds 2..), ``round_s`` (every round),
    ``rounds``, ``total_s`` (the whole ``run_simulation`` call, Ray start and stop included),
    ``final_test_mse`` (Average Global Loss of the final global model), ``eval_s`` (one test
    evaluation of every client), ``params``, ``torch_threads`` (per client),
    ``parallel_clients``, ``version`` and ``framework``.
  """
  if rounds < 2:
    raise ValueError(f"rounds {rounds}: need at least 2 (the first is reported apart)")
  import flwr

  # The client function must be pickled by reference (Ray sends the ClientApp to its actors
  # with every message), so take it from this module imported by name, not from __main__.
  import peer_flower
  import ray
  import torch
  from flwr.app import ArrayRecord, ConfigRecord, Context
  from flwr.clientapp import ClientApp
  from flwr.serverapp import Grid, ServerApp
  from flwr.serverapp.strategy import FedAvg
  from flwr.simulation import run_simulation

  logging.getLogger("flwr").setLevel(logging.ERROR)  # not a line per round and client
  clients = client_arrays(client_data)
  history, horizon = clients[0]["train_x"].shape[1], clients[0]["train_y"].shape[1]
  net = initial_torch_model(model, history, horizon, seed)
  params = sum(p.numel() for p in net.parameters() if p.requires_grad)
  cpus = os.cpu_count() or 1
  outcome: dict[str, Any] = {}
  with tempfile.TemporaryDirectory(prefix="peer_flower_") as tmp:
    data_path = str(Path(tmp) / "clients.npz")
    arrays = {f"x{i}": c["train_x"] for i, c in enumerate(clients)}
    arrays |= {f"y{i}": c["train_y"] for i, c in enumerate(clients)}
    np.savez(data_path, **arrays)

    client_app = ClientApp()
    client_app.train()(peer_flower.client_train)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
      times: list[float] = []

      def clock(server_round: int, arrays: ArrayRecord) -> None:
        times.append(time.perf_counter())

      strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=len(clients),
        min_available_nodes=len(clients),
      )
      train_config = ConfigRecord(
        {
          "data": data_path,
          "model": model,
          "local-steps": local_steps,
          "batch-size": batch_size,
          "lr": learning_rate,
          "seed": seed,
        }
      )
      result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(torch_state_dict=net.state_dict()),
        num_rounds=rounds,
        train_config=train_config,
        evaluate_fn=clock,
      )
      outcome["times"] = times
      outcome["arrays"] = result.arrays
      outcome["train_metrics"] = result.train_metrics_clientapp

    start = time.perf_counter()
    run_simulation(
      server_app=server_app,
      client_app=client_app,
      num_supernodes=len(clients),
      backend_config={
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "log_to_driver": False},
      },
    )
    total_s = time.perf_counter() - start
  if "times" not in outcome or len(outcome["times"]) != rounds + 1:
    raise RuntimeError("the Flower simulation did not finish its rounds (see its log above)")
  round_s = np.diff(outcome["times"]).tolist()
  net.load_state_dict(outcome["arrays"].to_torch_state_dict())
  final = test_mse(net, clients)
  t0 = time.perf_counter()  # timed warm: the first forward pass of a shape pays set-up costs
  test_mse(net, clients)
  eval_s = time.perf_counter() - t0
  last_metrics = outcome["train_metrics"].get(rounds, {})
  return {
    "framework": "flower",
    "version": f"flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}",
    "model": model,
    "rounds": len(round_s),
    "first_round_s": round_s[0],
    "median_round_s": statistics.median(round_s[1:]),
    "round_s": round_s,
    "total_s": total_s,
    "final_test_mse": final,
    "eval_s": eval_s,
    "params": params,
    "torch_threads": round(last_metrics["torch-threads"]) if last_metrics else None,
    "parallel_clients": int(cpus // cpus_per_client),
  }
