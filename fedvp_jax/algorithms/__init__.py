"""Federated algorithms as init/apply pure functions, and a registry by name."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import optax

from fedvp_jax.algorithms.aggregation import (
  SEND_MODES,
  aggregate,
  blend,
  check_send,
  is_finite,
  receive,
  weighted_mean,
  where_clients,
)
from fedvp_jax.algorithms.client import LocalUpdate, LossFn, local_update, prediction_loss, stack
from fedvp_jax.algorithms.core import (
  ClientsRound,
  ClientsState,
  FederatedAlgorithm,
  RoundConfig,
  RoundMetrics,
  TrainResult,
  clients_round,
  evaluate_clients,
  evaluate_deployed,
  evaluate_on_schedule,
  init_clients,
  mean_train_loss,
  over_seeds,
  select_clients,
  train_clients,
)
from fedvp_jax.algorithms.fedavg import fedavg
from fedvp_jax.algorithms.fedgen import (
  FedGenConfig,
  FedGenState,
  GeneratorContext,
  GeneratorUpdate,
  diversity_loss,
  fedgen,
  fedgen_client_loss,
  generator_update,
  generator_weights,
  teacher_loss,
)
from fedvp_jax.errors import ConfigError
from fedvp_jax.models import Model


class AlgorithmSpec(NamedTuple):
  """What a named algorithm is.

  Attributes:
    send: what the server sends back (see :mod:`fedvp_jax.algorithms.aggregation`).
    generator: whether it trains FedGen's generator.
  """

  send: str
  generator: bool


ALGORITHMS = {
  "local": AlgorithmSpec("none", False),
  "fedavg": AlgorithmSpec("full", False),
  "partial-fedavg": AlgorithmSpec("partial", False),
  "fedgen": AlgorithmSpec("full", True),
  "local-fedgen": AlgorithmSpec("none", True),
  "partial-fedgen": AlgorithmSpec("partial", True),
}
"""Every algorithm by its name on the command line."""

RESEARCHER_NAMES = {
  "local": "local",
  "FedAvg": "fedavg",
  "partialFedAvg": "partial-fedavg",
  "FedGen": "fedgen",
  "localFedGen": "local-fedgen",
  "partialFedGen": "partial-fedgen",
}
"""The researcher's ``--algorithm`` names (FedGen's code base) and the algorithm each means."""


def build_algorithm(
  name: str,
  model: Model,
  optimizer: optax.GradientTransformation,
  config: RoundConfig,
  fedgen_config: FedGenConfig | None = None,
) -> FederatedAlgorithm:
  """The named algorithm. ``config.send`` is overridden by what the name implies;
  ``fedgen_config`` is used by the FedGen family only (defaults when ``None``).

  Raises:
    ConfigError: for an unknown name.
  """
  if name not in ALGORITHMS:
    raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
  spec = ALGORITHMS[name]
  config = dataclasses.replace(config, send=spec.send)
  if spec.generator:
    return fedgen(model, optimizer, config, fedgen_config or FedGenConfig())
  return fedavg(model, optimizer, config)


__all__ = [
  "ALGORITHMS",
  "RESEARCHER_NAMES",
  "SEND_MODES",
  "AlgorithmSpec",
  "ClientsRound",
  "ClientsState",
  "FedGenConfig",
  "FedGenState",
  "FederatedAlgorithm",
  "GeneratorContext",
  "GeneratorUpdate",
  "LocalUpdate",
  "LossFn",
  "RoundConfig",
  "RoundMetrics",
  "TrainResult",
  "aggregate",
  "blend",
  "build_algorithm",
  "check_send",
  "clients_round",
  "diversity_loss",
  "evaluate_clients",
  "evaluate_deployed",
  "evaluate_on_schedule",
  "fedavg",
  "fedgen",
  "fedgen_client_loss",
  "generator_update",
  "generator_weights",
  "init_clients",
  "is_finite",
  "local_update",
  "mean_train_loss",
  "over_seeds",
  "prediction_loss",
  "receive",
  "select_clients",
  "stack",
  "teacher_loss",
  "train_clients",
  "weighted_mean",
  "where_clients",
]
