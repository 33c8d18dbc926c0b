"""FedAvg round time in Apple's pfl-research (PyTorch backend) on fedvp_jax's FedAvg workload.

Install, in a virtual environment of its own (pfl pins ``absl-py~=1.0`` through
``dp-accounting``, older than the ``absl-py>=2.3.1`` that chex wants), with torch 2.13.0 (the
CPU build on this machine's disk) installed first so that pfl's ``torch>=2.0.1,<3`` is already
met and pip does not fetch a CUDA build::

  python -m venv --system-site-packages /tmp/venv_pfl      # sees jax, flax and fedvp_jax
  /tmp/venv_pfl/bin/pip install torch==2.13.0
  /tmp/venv_pfl/bin/pip install "pfl[pytorch]"

Tested with pfl 0.6.0, torch 2.13.0+cpu, Python 3.11.7 (pfl 0.6.0 needs Python >=3.10,<3.13).
pip then reports ``chex 0.1.92 requires absl-py>=2.3.1, but you have absl-py 1.4.0``; jax,
chex and fedvp_jax still import and run in that environment.

What is measured: the same FedAvg workload as ``benchmarks/round_time.py --algos fedavg``: 10
clients (the users ``prepare(RunConfig.of(num_clients=10))`` draws), every client in every round
(cohort size 10, users drawn with pfl's ``MinimizeReuseUserSampler``, which cycles through
them, so each round trains each user exactly once), 10 local SGD steps (lr 0.01) of batch 64,
then the update averaged weighted by each client's number of training windows
(``WeightByDatapoints``) and applied by a central SGD optimizer with lr 1.0, which makes it
plain FedAvg. The models are ``benchmarks/torch_models.py``'s PyTorch twins of fedvp_jax's
(PyTorch's fused kernels), starting from the same parameters as a fedvp_jax run with the same
seed; after 8 rounds the final test MSE agrees with fedvp_jax's to 3 significant digits
(transformer 0.002716 vs 0.0027158, lstm 0.002768 vs 0.0027674). Per-round wall time is taken
by a ``TrainingProcessCallback`` after every central iteration; the first round is reported
apart and the median is over the others.

Differences from fedvp_jax's round:

* fedvp_jax's round also evaluates every client's deployed model on its test windows
  (``eval_every=1``); pfl's rounds here do not (in pfl's favour). ``eval_s`` reports what one
  such evaluation (every client's test windows, one forward pass) costs in PyTorch.
* pfl's first central iteration also evaluates each user's training loss before and after
  local training (``evaluation_frequency`` counts from iteration 0); that is in
  ``first_round_s`` only.
* pfl trains the users of a cohort one after another in one process (its multi-worker mode,
  several processes under ``torchrun``/``torch.distributed``, is not used here), with
  PyTorch's intra-op threads, where fedvp_jax ``vmap``s all clients in one XLA program.
  PyTorch's default is a thread per core; on a machine shared with other jobs, two OpenMP
  threads on two busy cores wait on each other, and transformer rounds then ranged from 0.8 to
  30 s; ``--torch-threads 1`` gives steady times there.
* Minibatches: each client walks a fresh random permutation of its windows, wrapping around,
  as fedvp_jax's sampler does (a ``Dataset`` subclass; pfl's own ``Dataset.iter`` slices in a
  fixed order and stops at the end of the data).

Run it through the side-by-side benchmark, which prepares the same clients and prints the table
beside fedvp_jax's (from the repository root)::

  python benchmarks/run.py --sections peers --pfl-python /tmp/venv_pfl/bin/python
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_models beside this file

from peer_common import client_arrays, initial_torch_model, test_mse


def torch_loss(prediction: Any, target: Any) -> Any:
  """The training loss, ``torch_models.mse`` (fedvp_jax's: the mean over every element)."""
  import torch_models

  return torch_models.mse(prediction, target)


def time_fedavg(
  client_data: Any,
  model: str,
  rounds: int,
  *,
  local_steps: int = 10,
  batch_size: int = 64,
  learning_rate: float = 0.01,
  seed: int = 0,
  torch_threads: int | None = None,
) -> dict[str, Any]:
  """Runs ``rounds`` FedAvg rounds of ``model`` in pfl's simulator and times each.

  Args:
    client_data: a :class:`fedvp_jax.data.federated.ClientData` (for example
      ``prepare(config).data``); client i is a pfl user with its real windows.
    model: ``"transformer"`` or ``"lstm"``.
    rounds: central iterations (at least 2: the first is reported apart).
    local_steps: SGD steps per client per round.
    batch_size: windows per step.
    learning_rate: the clients' SGD learning rate.
    seed: seeds the model's initialisation, pfl's samplers and the minibatches.
    torch_threads: ``torch.set_num_threads`` for the run (``None``: PyTorch's default, one per
      core).

  Returns:
    ``first_round_s``, ``median_round_s`` (over rounds 2..), ``round_s`` (every round),
    ``rounds``, ``final_test_mse`` (Average Global Loss of the final central model),
    ``eval_s`` (one test evaluation of every client), ``params``, ``torch_threads``,
    ``version`` and ``framework``.
  """
  if rounds < 2:
    raise ValueError(f"rounds {rounds}: need at least 2 (the first is reported apart)")
  import pfl
  import torch
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.aggregate.weighting import WeightByDatapoints
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.callback.base import TrainingProcessCallback
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import MinimizeReuseUserSampler
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
  from pfl.metrics import Metrics, Weighted
  from pfl.model.pytorch import PyTorchModel

  previous_threads = torch.get_num_threads()
  if torch_threads is not None:
    torch.set_num_threads(torch_threads)
  threads = torch.get_num_threads()
  clients = client_arrays(client_data)
  history, horizon = clients[0]["train_x"].shape[1], clients[0]["train_y"].shape[1]
  np.random.seed(seed)  # pfl's algorithm and dataset seeds come from numpy's global state
  net = initial_torch_model(model, history, horizon, seed)

  class Module(torch.nn.Module):
    """pfl's PyTorch model contract: the network plus ``loss`` and ``metrics``."""

    def __init__(self, net: torch.nn.Module):
      super().__init__()
      self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
      self.train()
      return torch_loss(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
      self.eval()
      value = float(torch_loss(self.net(x), y)) * len(x)
      self.train()
      return {"loss": Weighted(value, len(x))}

  class SampledDataset(Dataset):
    """A user's windows; training batches walk fresh random permutations, wrapping around."""

    def __init__(self, x: np.ndarray, y: np.ndarray, user_id: int):
      super().__init__((x, y), user_id=str(user_id))
      self.rng = np.random.default_rng([seed, user_id])

    def iter(self, batch_size: int | None):
      if batch_size is None or batch_size >= len(self):  # evaluation: one batch of all
        yield self.raw_data
        return
      x, y = self.raw_data
      order = self.rng.permutation(len(self))
      flat = np.arange(local_steps * batch_size) % len(self)
      for step in range(local_steps):
        idx = order[flat[step * batch_size : (step + 1) * batch_size]]
        yield x[idx], y[idx]

  class RoundClock(TrainingProcessCallback):
    """Wall-clock time at the start of training and after every central iteration."""

    def __init__(self) -> None:
      self.times: list[float] = []

    def on_train_begin(self, *, model: Any) -> Metrics:
      self.times = [time.perf_counter()]
      return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      self.times.append(time.perf_counter())
      return False, Metrics()

  users = {i: SampledDataset(c["train_x"], c["train_y"], i) for i, c in enumerate(clients)}
  training_data = FederatedDataset(users.__getitem__, MinimizeReuseUserSampler(list(users)))
  backend = SimulatedBackend(
    training_data=training_data, val_data=None, postprocessors=[WeightByDatapoints()]
  )
  module = Module(net)
  pfl_model = PyTorchModel(
    model=module,
    local_optimizer_create=torch.optim.SGD,
    central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
  )
  algorithm_params = NNAlgorithmParams(
    central_num_iterations=rounds,
    evaluation_frequency=rounds + 1,  # iteration 0 only; see the module docstring
    train_cohort_size=len(clients),
    val_cohort_size=0,
  )
  train_params = NNTrainHyperParams(
    local_num_epochs=None,
    local_learning_rate=learning_rate,
    local_batch_size=batch_size,
    local_num_steps=local_steps,
  )
  clock = RoundClock()
  try:
    FederatedAveraging().run(
      algorithm_params=algorithm_params,
      backend=backend,
      model=pfl_model,
      model_train_params=train_params,
      model_eval_params=NNEvalHyperParams(local_batch_size=None),
      callbacks=[clock],
      send_metrics_to_platform=False,
    )
    final = test_mse(net, clients)
    t0 = time.perf_counter()  # timed warm: the first forward pass of a shape pays set-up costs
    test_mse(net, clients)
    eval_s = time.perf_counter() - t0
  finally:
    torch.set_num_threads(previous_threads)
  round_s = np.diff(clock.times).tolist()
  return {
    "framework": "pfl",
    "version": f"pfl {pfl.__version__}, torch {torch.__version__}",
    "model": model,
    "rounds": len(round_s),
    "first_round_s": round_s[0],
    "median_round_s": statistics.median(round_s[1:]),
    "round_s": round_s,
    "final_test_mse": final,
    "eval_s": eval_s,
    "params": sum(p.numel() for p in net.parameters() if p.requires_grad),
    "torch_threads": threads,
  }
