"""Local training, FedAvg and partial FedAvg, each with beta blending.

One round: every client receives the server's model (all of it, its head, or nothing) and
blends it in with ``beta``; the deployed models are evaluated; the selected clients train
``local_steps`` minibatch steps from there; the server averages their models weighted by
their training-sample counts.
"""

from __future__ import annotations

import optax

from fedvp_jax.algorithms.aggregation import aggregate, receive
from fedvp_jax.algorithms.client import local_update, prediction_loss
from fedvp_jax.algorithms.core import (
    ClientsState,
    FederatedAlgorithm,
    RoundConfig,
    RoundMetrics,
    evaluate_deployed,
    evaluate_on_schedule,
    init_clients,
    mean_train_loss,
    train_clients,
)
from fedvp_jax.data.federated import ClientData
from fedvp_jax.models import Model
from fedvp_jax.types import PRNGKey

def fedavg(model: Model, optimizer: optax.GradientTransformation, config: RoundConfig) -> FederatedAlgorithm:
  """FedAvg with ``config.send`` deciding what clients receive (``none`` is local training).

  The state is a :class:`ClientsState`.

  Args:
    model: the viewport model.
    optimizer: every client's local optimizer.
    config: the round's settings.
  """
  config.check()
  update = local_update(prediction_loss(model), optimizer)

  def init(key: PRNGKey, data: ClientData) -> ClientsState:
    return init_clients(model, optimizer, key, data.num_clients)

  def apply(state: ClientsState, data: ClientData, key: PRNGKey) -> tuple[ClientsState, RoundMetrics]:
    params = receive(state.server_params, state.client_params, config.send, config.beta)
    test, evaluated = evaluate_on_schedule(model, config, params, data, state.round)
    result = train_clients(config, update, params, state.client_opt_state, data, key)
    weights = data.train_counts[result.selected]
    server, used = aggregate(state.server_params, result.trained, weights)
    new_state = ClientsState(server, result.client_params, result.client_opt_state, state.round + 1)
    metrics = RoundMetrics(
        train_loss=mean_train_loss(result.losses, weights),
        test=test,
        evaluated=evaluated,
        selected=result.selected,
        excluded=~used,
    )
    return new_state, metrics

  def evaluate(state: ClientsState, data: ClientData):
    return evaluate_deployed(model, config, state, data)

  return FederatedAlgorithm(init, apply, evaluate)
