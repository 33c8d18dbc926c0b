"""Local training, FedAvg and partial FedAvg, each with beta blending.

One round: every client receives the server's model (all of it, its head, or nothing) and
blends it in with ``beta``; the deployed models are evaluated; the selected clients train
``local_steps`` minibatch steps from there; the server averages their models weighted by
their training-sample counts.
"""

from __future__ import annotations

import optax

from fedvp_jax.algorithms import core
from fedvp_jax.algorithms.client import local_update, prediction_loss
from fedvp_jax.algorithms.core import ClientsState, FederatedAlgorithm, RoundMetrics
from fedvp_jax.config import RoundConfig
from fedvp_jax.data.federated import ClientData
from fedvp_jax.metrics import ErrorSums
from fedvp_jax.models import Model
from fedvp_jax.types import PRNGKey


def fedavg(
  model: Model, optimizer: optax.GradientTransformation, config: RoundConfig
) -> FederatedAlgorithm:
  """FedAvg with ``config.send`` deciding what clients receive (``none`` is local training).

  The state is a :class:`ClientsState`.

  Args:
    model: the viewport model.
    optimizer: every client's local optimizer.
    config: the round's settings.
  """
  update = local_update(prediction_loss(model), optimizer)

  def init(key: PRNGKey, data: ClientData) -> ClientsState:
    config.check_clients(data.num_clients)
    return core.init_clients(model, optimizer, key, data.num_clients)

  def apply(
    state: ClientsState, data: ClientData, key: PRNGKey
  ) -> tuple[ClientsState, RoundMetrics]:
    outcome = core.clients_round(model, config, update, state, data, key)
    return outcome.state, outcome.metrics

  def evaluate(state: ClientsState, data: ClientData) -> ErrorSums:
    return core.evaluate_deployed(model, config, state, data)

  return FederatedAlgorithm(init, apply, evaluate)
