"""The algorithms by their names (:data:`fedvp_jax.config.ALGORITHMS`)."""

from __future__ import annotations

import dataclasses

import optax

from fedvp_jax.algorithms.core import FederatedAlgorithm
from fedvp_jax.algorithms.fedavg import fedavg
from fedvp_jax.algorithms.fedgen import fedgen
from fedvp_jax.config import ALGORITHMS, FedGenConfig, RoundConfig, require
from fedvp_jax.models import Model


def build_algorithm(
  name: str,
  model: Model,
  optimizer: optax.GradientTransformation,
  config: RoundConfig,
  fedgen_config: FedGenConfig | None = None,
) -> FederatedAlgorithm:
  """The named algorithm. ``config.send`` is replaced by what the name implies;
  ``fedgen_config`` is used by the FedGen family only (defaults when ``None``).

  Raises:
    SettingError: for an unknown name.
  """
  require("algorithm", name)
  spec = ALGORITHMS[name]
  config = dataclasses.replace(config, send=spec.send)
  if spec.generator:
    return fedgen(model, optimizer, config, fedgen_config or FedGenConfig())
  return fedavg(model, optimizer, config)
