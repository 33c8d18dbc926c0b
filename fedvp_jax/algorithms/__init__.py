"""Federated algorithms as init/apply pure functions, and a registry by name."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from fedvp_jax.algorithms.aggregation import SEND_MODES, aggregate, blend, receive, weighted_mean
from fedvp_jax.algorithms.client import local_update, prediction_loss
from fedvp_jax.algorithms.core import (
    ClientsState,
    FederatedAlgorithm,
    RoundConfig,
    RoundMetrics,
)
from fedvp_jax.algorithms.fedavg import fedavg
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
}
"""Every algorithm by its name on the command line."""

RESEARCHER_NAMES = {
    "local": "local",
    "FedAvg": "fedavg",
    "partialFedAvg": "partial-fedavg",
}
"""The researcher's ``--algorithm`` names (FedGen's code base) and the algorithm each means."""


def build_algorithm(
    name: str,
    model: Model,
    optimizer: optax.GradientTransformation,
    config: RoundConfig,
    fedgen_options: dict[str, Any] | None = None,
) -> FederatedAlgorithm:
  """The named algorithm. ``config.send`` is overridden by what the name implies.

  Raises:
    ConfigError: for an unknown name.
  """
  if name not in ALGORITHMS:
    raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
  del fedgen_options
  spec = ALGORITHMS[name]
  config = RoundConfig(**{**config.__dict__, "send": spec.send})
  return fedavg(model, optimizer, config)


__all__ = [
    "ALGORITHMS",
    "RESEARCHER_NAMES",
    "SEND_MODES",
    "AlgorithmSpec",
    "ClientsState",
    "FederatedAlgorithm",
    "RoundConfig",
    "RoundMetrics",
    "aggregate",
    "blend",
    "build_algorithm",
    "fedavg",
    "local_update",
    "prediction_loss",
    "receive",
    "weighted_mean",
]
