"""The benchmarks' workload, built from the stable library API only.

``fedvp_jax.experiment``, ``fedvp_jax.rounds`` and ``fedvp_jax.runner`` are the command line's
layers and change with it; the benchmarks need just data, a model and an algorithm, so they
build those from ``fedvp_jax.data``, ``fedvp_jax.models``, ``fedvp_jax.algorithms`` and the
settings' records in ``fedvp_jax.config``, with the researcher's settings as defaults.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax

from fedvp_jax.algorithms import FederatedAlgorithm, build_algorithm
from fedvp_jax.config import FedGenConfig, RoundConfig
from fedvp_jax.data import build_client_data, load_traces, parse_spec, select_users
from fedvp_jax.data.federated import ClientData
from fedvp_jax.models import Model, build_model

NO_EVALUATION = 10**6
"""``eval_every`` of timed rounds: only round 0 evaluates."""


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmark configuration; the defaults are the researcher's setting (issue 7)."""

  algo: str = "fedavg"
  model: str = "transformer"
  dataset: str = "David-m10-h1"
  data_dir: str | None = None
  num_users: int | None = 10
  local_steps: int = 10
  batch_size: int = 64
  learning_rate: float = 0.01
  latent_dim: int = 32
  eval_every: int = NO_EVALUATION
  seed: int = 0
  fedgen: FedGenConfig = dataclasses.field(default_factory=FedGenConfig)

  def optimizer(self) -> optax.GradientTransformation:
    return optax.sgd(self.learning_rate)

  def round_config(self) -> RoundConfig:
    # The PyTorch peers train on MSE (as the researcher's code does), so the workload does.
    return RoundConfig(
      local_steps=self.local_steps,
      batch_size=self.batch_size,
      eval_every=self.eval_every,
      loss="mse",
    )


@dataclasses.dataclass(frozen=True)
class Built:
  """A workload's data, model and algorithm on the default device."""

  workload: Workload
  history: int
  horizon: int
  data: ClientData
  net: Model
  algorithm: FederatedAlgorithm


@functools.cache
def _client_data(dataset: str, data_dir: str | None, num_users: int | None, seed: int) -> Any:
  # Host copies, cached: several sections load the same clients, and parsing traces is slow.
  spec = parse_spec(dataset)
  traces = load_traces(spec, data_dir, seed=seed)
  users = select_users(traces, num_users, seed=seed)
  return spec, jax.device_get(build_client_data(traces, spec, users, seed=seed))


def build(workload: Workload) -> Built:
  """Loads the clients' windows and builds the model and algorithm of ``workload``."""
  spec, host = _client_data(workload.dataset, workload.data_dir, workload.num_users, workload.seed)
  net = build_model(workload.model, spec.history, spec.horizon, latent_dim=workload.latent_dim)
  algorithm = build_algorithm(
    workload.algo, net, workload.optimizer(), workload.round_config(), workload.fedgen
  )
  data = jax.tree.map(jax.numpy.asarray, host)
  return Built(workload, spec.history, spec.horizon, data, net, algorithm)


def resolve_device(name: str) -> jax.Device:
  """The first device of platform ``name`` (``cpu``, or ``gpu`` / ``cuda``)."""
  return jax.devices("gpu" if name in ("gpu", "cuda") else name)[0]
