"""Federated algorithms as init/apply pure functions, and a registry by name."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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
from fedvp_jax.algorithms.fedgen import FedGenConfig, FedGenState, fedgen
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
  "ClientsState",
  "FedGenConfig",
  "FedGenState",
  "FederatedAlgorithm",
  "RoundConfig",
  "RoundMetrics",
  "aggregate",
  "blend",
  "build_algorithm",
  "fedavg",
  "fedgen",
  "local_update",
  "prediction_loss",
  "receive",
  "weighted_mean",
]
