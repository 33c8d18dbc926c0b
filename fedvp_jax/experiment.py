"""An experiment: the data, model and algorithm a :class:`~fedvp_jax.config.RunConfig`
describes, assembled and ready to run, and the trivial predictors on the same test windows."""

from __future__ import annotations

import dataclasses

import optax
from jax.sharding import Mesh

from fedvp_jax.algorithms.by_name import build_algorithm
from fedvp_jax.algorithms.core import FederatedAlgorithm
from fedvp_jax.baselines import BASELINES
from fedvp_jax.config import RunConfig
from fedvp_jax.data.datasets import DatasetSpec, load_traces, parse_spec
from fedvp_jax.data.federated import ClientData, build_client_data, select_users
from fedvp_jax.metrics import Summary, error_sums, summarize
from fedvp_jax.models import build_model
from fedvp_jax.sharding import client_mesh, shard_data


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A configuration's data, model and algorithm, ready to run.

  Attributes:
    config: the configuration.
    spec: the parsed dataset spec.
    users: the viewers who are clients, client i being ``users[i]``.
    data: their windows on device.
    algorithm: the federated algorithm.
    mesh: the ``"clients"`` device mesh ``data`` is split over, or ``None`` (one device).
  """

  config: RunConfig
  spec: DatasetSpec
  users: tuple[str, ...]
  data: ClientData
  algorithm: FederatedAlgorithm
  mesh: Mesh | None = None


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
  """The clients' optax optimizer at ``config.learning_rate``."""
  return {"sgd": optax.sgd, "adam": optax.adam}[config.optimizer](config.learning_rate)


def prepare(config: RunConfig) -> Experiment:
  """Loads the data and builds the model and algorithm that ``config`` describes.

  Raises:
    DataError, SettingError: for data that cannot serve ``config``.
  """
  spec = parse_spec(config.dataset)
  traces = load_traces(spec, config.data_dir, seed=config.seed)
  users = select_users(traces, config.num_clients, config.users, seed=config.seed)
  data = build_client_data(traces, spec, users, config.split, seed=config.seed)
  model = build_model(config.model, spec.history, spec.horizon, latent_dim=config.latent_dim)
  algorithm = build_algorithm(
    config.algorithm, model, make_optimizer(config), config.round, config.fedgen
  )
  mesh = None
  if config.devices is not None:
    mesh = client_mesh(config.devices)
    data = shard_data(data, mesh)
  return Experiment(config, spec, users, data, algorithm, mesh)


def baseline_summaries(data: ClientData, horizon: int) -> dict[str, Summary]:
  """The trivial predictors' errors on every client's test windows."""
  return {
    name: summarize(error_sums(predict(data.test_x, horizon), data.test_y, data.test_mask))
    for name, predict in BASELINES.items()
  }


__all__ = ["Experiment", "baseline_summaries", "make_optimizer", "prepare"]
