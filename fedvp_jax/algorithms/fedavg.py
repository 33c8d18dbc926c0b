"""Local training, FedAvg and partial FedAvg, each with beta blending.

One round: every client receives the server's model (all of it, its head, or nothing) and
blends it in with ``beta``; the deployed models are evaluated; the selected clients train
``local_steps`` minibatch steps from there; the server averages their models weighted by
their training-sample counts. With DP on (``privacy``), the server instead applies DP-FedAvg's
noised mean of the clipped updates (:func:`fedvp_jax.algorithms.dp.private_round`).
"""

from __future__ import annotations

import optax

from fedvp_jax.algorithms import core, dp
from fedvp_jax.algorithms.client import LocalUpdate, augmented, local_update, prediction_loss
from fedvp_jax.algorithms.core import ClientsState, FederatedAlgorithm, RoundMetrics
from fedvp_jax.config import PrivacyConfig, RoundConfig
from fedvp_jax.data.federated import ClientData, EvalWindows
from fedvp_jax.metrics import ErrorSums
from fedvp_jax.models import Model
from fedvp_jax.types import PRNGKey


def fedavg_update(
  model: Model, optimizer: optax.GradientTransformation, config: RoundConfig
) -> LocalUpdate:
  """The FedAvg family's local update: ``config.loss`` on (``config.augment``-ed) batches."""
  return local_update(augmented(prediction_loss(model, config.loss), config.augment), optimizer)


def fedavg(
  model: Model,
  optimizer: optax.GradientTransformation,
  config: RoundConfig,
  privacy: PrivacyConfig | None = None,
) -> FederatedAlgorithm:
  """FedAvg with ``config.send`` deciding what clients receive (``none`` is local training).

  The state is a :class:`ClientsState`.

  Args:
    model: the viewport model.
    optimizer: every client's local optimizer.
    config: the round's settings.
    privacy: DP-FedAvg's settings, its noise multiplier resolved; ``None`` or DP off: plain
      FedAvg.
  """
  update = fedavg_update(model, optimizer, config)
  private = privacy if privacy is not None and privacy.enabled else None
  if private is not None:
    dp.noise_multiplier(private)  # fail now, not while tracing, if it was never chosen

  def init(key: PRNGKey, data: ClientData) -> ClientsState:
    config.check_clients(data.num_clients)
    return core.init_clients(model, optimizer, config, key, data.num_rows)

  def apply(
    state: ClientsState, data: ClientData, key: PRNGKey
  ) -> tuple[ClientsState, RoundMetrics]:
    outcome = core.clients_round(model, config, update, state, data, key)
    if private is not None:
      outcome = dp.private_round(state.server_params, outcome, private, config.send, key)
    return outcome.state, outcome.metrics

  def evaluate(
    state: ClientsState, data: ClientData, part: core.Part = "test", best: bool = False
  ) -> ErrorSums:
    return core.evaluate_deployed(model, state, data, part, best)

  def evaluate_global(state: ClientsState, windows: EvalWindows, best: bool = False) -> ErrorSums:
    return core.evaluate_server(model, state, windows, best)

  return FederatedAlgorithm(
    init, apply, evaluate, evaluate_global if config.send == "full" else None
  )
