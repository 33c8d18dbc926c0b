"""What every federated algorithm shares: its state, its interface, and the steps of a round
(receive, evaluate, select, train, aggregate) as pure functions.

An algorithm is a :class:`FederatedAlgorithm` of pure functions, fedjax-style: ``init`` builds
the state and ``apply`` runs one round; ``apply`` is what gets jitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedvp_jax.algorithms.aggregation import aggregate, is_finite, receive, where_clients
from fedvp_jax.algorithms.client import LocalUpdate, stack
from fedvp_jax.config import RoundConfig
from fedvp_jax.data.federated import ClientData, sample_batches, sample_final_targets
from fedvp_jax.metrics import ErrorSums, error_sums
from fedvp_jax.models import Model
from fedvp_jax.types import Params, PRNGKey, StackedOptState, StackedParams, State


@struct.dataclass
class ClientsState:
  """The part of the state every algorithm has.

  Attributes:
    server_params: ``Params``, the server's (aggregated) model.
    client_params: ``StackedParams``, leaves ``f32[clients, ...]``: each client's own model as
      it stands after its last local training.
    client_opt_state: ``StackedOptState``, leaves ``[clients, ...]``.
    round: ``i32[]`` rounds completed.
  """

  server_params: Params
  client_params: StackedParams
  client_opt_state: StackedOptState
  round: jax.Array


class RoundMetrics(NamedTuple):
  """What one round reports.

  Attributes:
    train_loss: ``f32[]`` mean local training loss of the clients that trained, weighted by
      their sample counts.
    test: per-client :class:`ErrorSums` of the deployed models on the test windows (zeros when
      this round did not evaluate).
    evaluated: ``bool[]`` whether ``test`` was computed this round.
    selected: ``i32[K]`` the clients that trained.
    excluded: ``bool[K]`` clients left out of aggregation because their update was
      non-finite.
    extra: algorithm-specific ``f32[]`` scalars by name (e.g. FedGen's teacher loss).
  """

  train_loss: jax.Array
  test: ErrorSums
  evaluated: jax.Array
  selected: jax.Array
  excluded: jax.Array
  extra: dict[str, jax.Array] = {}  # noqa: RUF012  (never mutated; pytrees need a dict)


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions.

  Attributes:
    init: ``(key, data) -> state``.
    apply: ``(state, data, key) -> (state, RoundMetrics)``: one round.
    evaluate: ``(state, data) -> ErrorSums``: the deployed models (each client's model after
      receiving the server's) on every client's test windows.
  """

  init: Callable[[PRNGKey, ClientData], State]
  apply: Callable[[State, ClientData, PRNGKey], tuple[State, RoundMetrics]]
  evaluate: Callable[[State, ClientData], ErrorSums]


def seed_axes(state: State) -> Any:
  """The vmap axes of a seeds-batched state: 0 for every leaf but the round counters.

  Every seed is at the same round, so ``round`` stays one unbatched ``i32[]``: a batched
  counter would make each ``lax.cond`` it steers (evaluation on its schedule, FedGen's stage
  one) a ``select`` that computes both branches every round.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: None if getattr(path[-1], "name", None) == "round" else 0, state
  )


def over_seeds(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
  """``algorithm`` run for several seeds at once, as one vmapped program.

  The keys and the state gain a leading seeds axis (``key[seeds]``, state leaves
  ``[seeds, ...]``, except the shared round counter, see :func:`seed_axes`) and so do the
  round's metrics and the evaluation; every seed shares ``data``. Seed s of the result equals
  ``algorithm`` run alone with seed s's keys, up to float rounding.

  Args:
    algorithm: any :class:`FederatedAlgorithm`.

  Returns:
    A :class:`FederatedAlgorithm` whose ``init(key[seeds], data)``, ``apply(state, data,
    key[seeds])`` and ``evaluate(state, data)`` work on every seed at once.
  """

  def init(keys: PRNGKey, data: ClientData) -> State:
    axes = seed_axes(jax.eval_shape(algorithm.init, keys[0], data))
    return jax.vmap(algorithm.init, in_axes=(0, None), out_axes=axes)(keys, data)

  def apply(state: State, data: ClientData, keys: PRNGKey) -> tuple[State, RoundMetrics]:
    axes = seed_axes(state)
    return jax.vmap(algorithm.apply, in_axes=(axes, None, 0), out_axes=(axes, 0))(state, data, keys)

  def evaluate(state: State, data: ClientData) -> ErrorSums:
    return jax.vmap(algorithm.evaluate, in_axes=(seed_axes(state), None))(state, data)

  return FederatedAlgorithm(init, apply, evaluate)


def init_clients(
  model: Model, optimizer: optax.GradientTransformation, key: PRNGKey, num_clients: int
) -> ClientsState:
  """Server and every client start from the same initial model, like FedGen's deep copies."""
  params = model.init(key)
  return ClientsState(
    server_params=params,
    client_params=stack(params, num_clients),
    client_opt_state=stack(optimizer.init(params), num_clients),
    round=jnp.zeros((), jnp.int32),
  )


def evaluate_clients(model: Model, params: StackedParams, data: ClientData) -> ErrorSums:
  """Every client's model on its own test windows."""
  prediction = jax.vmap(model.apply)(params, data.test_x)
  return error_sums(prediction, data.test_y, data.test_mask)


def evaluate_deployed(
  model: Model, config: RoundConfig, state: ClientsState, data: ClientData
) -> ErrorSums:
  """Test errors of the models clients would use now: theirs after receiving the server's."""
  deployed = receive(state.server_params, state.client_params, config.send, config.beta)
  return evaluate_clients(model, deployed, data)


def evaluate_on_schedule(
  model: Model,
  config: RoundConfig,
  params: StackedParams,
  data: ClientData,
  round_index: jax.Array,
) -> tuple[ErrorSums, jax.Array]:
  """Evaluates on rounds ``0, eval_every, 2 * eval_every, ...``; zeros (not computed) otherwise."""
  due = round_index % config.eval_every == 0
  evaluate = lambda: evaluate_clients(model, params, data)
  skip = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(evaluate))
  sums = jax.lax.cond(due, evaluate, skip)
  return sums, due


def select_clients(key: PRNGKey, num_clients: int, clients_per_round: int | None) -> jax.Array:
  """``i32[K]`` sorted indices of the clients that train this round, sampled without
  replacement; every client when ``clients_per_round`` is ``None`` or all."""
  if clients_per_round is None or clients_per_round == num_clients:
    return jnp.arange(num_clients)
  return jnp.sort(jax.random.choice(key, num_clients, (clients_per_round,), replace=False))


class TrainResult(NamedTuple):
  """Local training of the selected clients.

  Attributes:
    client_params: every client's params, ``f32[clients, ...]``, the selected ones trained
      (a selected client whose update is non-finite keeps the params it started from).
    client_opt_state: likewise for optimizer states.
    trained: the selected clients' trained params, ``f32[K, ...]`` (non-finite ones as they
      came out), for aggregation.
    selected: ``i32[K]``.
    batches: the minibatches they trained on, ``(f32[K, S, B, M, 3], f32[K, S, B, H, 3])``
      (and the label batches, see :func:`train_clients`).
    losses: ``f32[K, S]`` every step's loss.
    finite: ``bool[K]`` clients whose trained params and losses are all finite.
  """

  client_params: StackedParams
  client_opt_state: StackedOptState
  trained: StackedParams
  selected: jax.Array
  batches: tuple[jax.Array, ...]
  losses: jax.Array
  finite: jax.Array


def train_clients(
  config: RoundConfig,
  update: LocalUpdate,
  params: StackedParams,
  opt_state: StackedOptState,
  data: ClientData,
  key: PRNGKey,
  context: Any = None,
  label_batch_size: int = 0,
) -> TrainResult:
  """Selects this round's clients, draws their minibatches and trains them all at once.

  With ``label_batch_size > 0`` every step's batch also carries that many of the client's own
  final targets, ``f32[K, S, label_batch_size, 3]``, as a third element (FedGen's labels);
  the first two elements are the same as without.
  """
  select_key, batch_key, train_key = jax.random.split(key, 3)
  selected = select_clients(select_key, data.num_clients, config.clients_per_round)
  batches: tuple[jax.Array, ...] = sample_batches(
    batch_key, data, config.local_steps, config.batch_size, selected
  )
  if label_batch_size:
    label_key = jax.random.fold_in(batch_key, 1)
    labels = sample_final_targets(label_key, data, config.local_steps, label_batch_size, selected)
    batches = (*batches, labels)
  # When every client trains (the default) the selection is the identity: skip the gather and
  # scatter, which would copy every client's params and optimizer state each round.
  everyone = config.clients_per_round in (None, data.num_clients)
  take = lambda tree: tree if everyone else jax.tree.map(lambda leaf: leaf[selected], tree)
  start_params, start_opt = take(params), take(opt_state)
  trained, trained_opt, losses = update(start_params, start_opt, batches, train_key, context)
  finite = is_finite(trained) & jnp.all(jnp.isfinite(losses), axis=1)

  def put(full: Any, part: Any) -> Any:
    return part if everyone else jax.tree.map(lambda f, p: f.at[selected].set(p), full, part)

  return TrainResult(
    client_params=put(params, where_clients(finite, trained, start_params)),
    client_opt_state=put(opt_state, where_clients(finite, trained_opt, start_opt)),
    trained=trained,
    selected=selected,
    batches=batches,
    losses=losses,
    finite=finite,
  )


def mean_train_loss(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """Sample-weighted mean over clients of each client's mean step loss.

  Args:
    losses: ``f32[K, S]`` every step's loss.
    weights: ``f32[K]`` sample counts, 0 for clients that do not count (non-finite ones).

  Returns:
    ``f32[]``; NaN when no client counts, so that a round in which every client diverged is
    never reported as a loss of zero.
  """
  per_client = jnp.where(weights > 0, jnp.mean(losses, axis=1), 0.0)
  total = jnp.sum(weights)
  return jnp.where(
    total > 0, jnp.sum(per_client * weights) / jnp.where(total > 0, total, 1.0), jnp.nan
  )


class ClientsRound(NamedTuple):
  """The outcome of :func:`clients_round`.

  Attributes:
    state: the clients' state after the round.
    metrics: the round's metrics (``extra`` empty).
    result: the selected clients' training, for algorithms that do more with it.
    used: ``bool[K]`` the selected clients that were averaged in.
  """

  state: ClientsState
  metrics: RoundMetrics
  result: TrainResult
  used: jax.Array


def clients_round(
  model: Model,
  config: RoundConfig,
  update: LocalUpdate,
  state: ClientsState,
  data: ClientData,
  key: PRNGKey,
  context: Any = None,
  label_batch_size: int = 0,
) -> ClientsRound:
  """The round every algorithm shares: receive, evaluate, train the selected clients,
  aggregate their models weighted by their training-sample counts."""
  params = receive(state.server_params, state.client_params, config.send, config.beta)
  test, evaluated = evaluate_on_schedule(model, config, params, data, state.round)
  result = train_clients(
    config, update, params, state.client_opt_state, data, key, context, label_batch_size
  )
  # A client whose loss diverged is left out even if its params still look finite.
  weights = jnp.where(result.finite, data.train_counts[result.selected], 0.0)
  server, used = aggregate(state.server_params, result.trained, weights)
  metrics = RoundMetrics(
    train_loss=mean_train_loss(result.losses, weights),
    test=test,
    evaluated=evaluated,
    selected=result.selected,
    excluded=~used,
  )
  new_state = ClientsState(server, result.client_params, result.client_opt_state, state.round + 1)
  return ClientsRound(new_state, metrics, result, used)
