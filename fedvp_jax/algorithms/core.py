"""What every federated algorithm shares: its state, its interface, and the steps of a round
(receive, evaluate, select, train, aggregate) as pure functions.

An algorithm is a :class:`FederatedAlgorithm` of pure functions, fedjax-style: ``init`` builds
the state and ``apply`` runs one round; ``apply`` is what gets jitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedvp_jax.algorithms.aggregation import (
  aggregate,
  is_finite,
  receive_sent,
  send_mask,
  where_clients,
)
from fedvp_jax.algorithms.client import LocalUpdate, stack
from fedvp_jax.config import TRACED, RoundConfig
from fedvp_jax.data.federated import (
  ClientData,
  EvalWindows,
  client_keys,
  sample_batches,
  sample_final_targets,
)
from fedvp_jax.errors import SettingError
from fedvp_jax.metrics import ErrorSums, error_sums, summarize
from fedvp_jax.models import Model
from fedvp_jax.types import Params, PRNGKey, StackedOptState, StackedParams, State

NOT_VALIDATED = float(jnp.finfo(jnp.float32).max)
"""``Selected.validation_loss`` of models never validated: finite, so that a state stays
finite unless training diverged, and above every real loss."""


@struct.dataclass
class Selected:
  """The models of the evaluated round with the lowest validation loss so far: what a run
  deploys (model selection on validation, never on test).

  Attributes:
    client_params: ``StackedParams``, leaves ``f32[clients, ...]``: each client's deployed
      model at that round (its own after receiving the server's).
    server_params: ``Params``, the server's model at that round.
    validation_loss: ``f32[]`` their validation loss (the sample-weighted MSE over every
      client's validation windows); :data:`NOT_VALIDATED` before the first evaluation and
      without validation windows.
    from_round: ``i32[]`` the round whose start they are (-1 before the first evaluation).
  """

  client_params: StackedParams
  server_params: Params
  validation_loss: jax.Array
  from_round: jax.Array


@struct.dataclass
class RoundHyperparams:
  """The round's settings that are values, not program structure: held in the state (like
  ``optax.inject_hyperparams``' learning rate in an optimizer state), so a new value never
  recompiles, and configurations that differ only in them run as one vmapped program
  (:func:`over_configs`).

  Attributes:
    beta: ``f32[]`` the server's share of each layer a client receives.
    sent: ``Params``-shaped tree of ``f32[]``: 1 where the server sends the layer, 0 where the
      client keeps its own (:func:`~fedvp_jax.algorithms.aggregation.send_mask` of the send
      mode: full, head only or nothing).
  """

  beta: jax.Array
  sent: Params


def round_hyperparams(config: RoundConfig, params: Params) -> RoundHyperparams:
  """``config``'s :class:`RoundHyperparams` for a model with ``params``."""
  return RoundHyperparams(jnp.asarray(config.beta, jnp.float32), send_mask(params, config.send))


@struct.dataclass
class ClientsState:
  """The part of the state every algorithm has.

  Attributes:
    server_params: ``Params``, the server's (aggregated) model.
    client_params: ``StackedParams``, leaves ``f32[clients, ...]``: each client's own model as
      it stands after its last local training.
    client_opt_state: ``StackedOptState``, leaves ``[clients, ...]`` (an
      ``optax.inject_hyperparams`` optimizer holds its learning rate here, ``f32[clients]``).
    round: ``i32[]`` rounds completed.
    selected: the models chosen on validation so far (:class:`Selected`).
    hyper: the round's settings held as values (:class:`RoundHyperparams`).
  """

  server_params: Params
  client_params: StackedParams
  client_opt_state: StackedOptState
  round: jax.Array
  selected: Selected
  hyper: RoundHyperparams

  def with_hyperparam(self, name: str, value: Any) -> ClientsState:
    """This state with setting ``name`` (one held as a value: ``beta``, ``send`` as a
    :func:`~fedvp_jax.algorithms.aggregation.send_mask`, or ``learning_rate``, which an
    ``optax.inject_hyperparams`` optimizer holds) set to ``value``.

    Raises:
      SettingError: for another setting, or a learning rate the optimizer does not hold.
    """
    if name == "beta":
      return dataclasses.replace(
        self, hyper=dataclasses.replace(self.hyper, beta=_like(self.hyper.beta, value))
      )
    if name == "send":
      return dataclasses.replace(self, hyper=dataclasses.replace(self.hyper, sent=value))
    if name == "learning_rate":
      held = getattr(self.client_opt_state, "hyperparams", {})
      if "learning_rate" not in held:
        raise SettingError(
          name, None, "the clients' optimizer must hold it: build it with optax.inject_hyperparams"
        )
      rates = {**held, "learning_rate": _like(held["learning_rate"], value)}
      return dataclasses.replace(
        self, client_opt_state=self.client_opt_state._replace(hyperparams=rates)
      )
    raise SettingError(name, None, "is not one of this algorithm's settings held as values")


class RoundMetrics(NamedTuple):
  """What one round reports.

  Attributes:
    train_loss: ``f32[]`` mean local training loss of the clients that trained, weighted by
      their sample counts.
    test: per-client :class:`ErrorSums` of the deployed models on the test windows (zeros when
      this round did not evaluate).
    validation: the same on the validation windows.
    evaluated: ``bool[]`` whether ``test`` and ``validation`` were computed this round.
    selected: ``i32[K]`` the clients that trained.
    excluded: ``bool[K]`` clients left out of aggregation because their update was
      non-finite.
    extra: algorithm-specific ``f32[]`` scalars by name (e.g. FedGen's teacher loss).
  """

  train_loss: jax.Array
  test: ErrorSums
  validation: ErrorSums
  evaluated: jax.Array
  selected: jax.Array
  excluded: jax.Array
  extra: dict[str, jax.Array] = {}  # noqa: RUF012  (never mutated; pytrees need a dict)


Part = str
"""Which of a :class:`~fedvp_jax.data.ClientData`'s windows to evaluate on: ``"test"`` or
``"validation"``."""


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions.

  Attributes:
    init: ``(key, data) -> state``.
    apply: ``(state, data, key) -> (state, RoundMetrics)``: one round.
    evaluate: ``(state, data, part="test", best=False) -> ErrorSums``: the deployed models
      (each client's model after receiving the server's; with ``best``, those chosen on
      validation, :class:`Selected`) on every client's ``part`` windows. ``part`` and
      ``best`` are static.
    evaluate_global: ``(state, windows, best=False) -> ErrorSums``: the server's model on
      ``windows`` of viewers who never trained (:class:`~fedvp_jax.data.EvalWindows`, one row
      per viewer); ``None`` for algorithms whose server model is not what clients deploy
      (local training, head-only sending).
  """

  init: Callable[[PRNGKey, ClientData], State]
  apply: Callable[[State, ClientData, PRNGKey], tuple[State, RoundMetrics]]
  evaluate: Callable[..., ErrorSums]
  evaluate_global: Callable[..., ErrorSums] | None = None


def seed_axes(state: State) -> Any:
  """The vmap axes of a seeds-batched state: 0 for every leaf but the round counters and the
  settings held as values (``hyper``: every seed runs the same configuration).

  Every seed is at the same round, so ``round`` stays one unbatched ``i32[]``: a batched
  counter (or a batched setting, such as FedGen's pretraining length) would make each
  ``lax.cond`` it steers (evaluation on its schedule, FedGen's stage one) a ``select`` that
  computes both branches every round.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: None if _is_round(path) or _is_hyper(path) else 0, state
  )


def _is_round(path: Any) -> bool:
  return getattr(path[-1], "name", None) == "round"


def _is_hyper(path: Any) -> bool:
  return any(getattr(entry, "name", None) == "hyper" for entry in path)


def _like(leaf: jax.Array, value: Any) -> jax.Array:
  """``value`` with ``leaf``'s dtype and shape (a per-client copy where ``leaf`` has one)."""
  return jnp.broadcast_to(jnp.asarray(value, leaf.dtype), leaf.shape)


def config_axes(state: State) -> Any:
  """The vmap axes of a configurations-batched state (:func:`over_configs`): 0 for every leaf
  but the round counter, which every configuration shares."""
  return jax.tree_util.tree_map_with_path(lambda path, _: None if _is_round(path) else 0, state)


Hyperparams = Mapping[str, Sequence[Any]]
"""Settings held as values, by name, ``C`` values each (one per configuration): a sequence or
an array ``[C]``; ``send`` as names (``"full"``, ``"partial"``, ``"none"``). Which settings
these can be is declared in :mod:`fedvp_jax.config` (``Setting.traced``)."""


def over_configs(
  algorithm: FederatedAlgorithm, hyperparams: Hyperparams, rounds: Sequence[int] | None = None
) -> FederatedAlgorithm:
  """``algorithm`` run for ``C`` configurations at once, as one vmapped program: the
  configurations differ only in ``hyperparams``, settings the state holds as values
  (:class:`RoundHyperparams`, FedGen's
  :class:`~fedvp_jax.algorithms.fedgen.GeneratorHyperparams`, the optimizers' injected learning
  rates), so one compile serves them all.

  Configuration c equals ``algorithm`` built with its settings and run alone with the same
  key, up to float rounding. Every configuration shares the key (as separate runs of one seed
  would), ``data`` and the round counter; :func:`over_seeds` on top adds seeds (state leaves
  ``[seeds, C, ...]``).

  Args:
    algorithm: built from any one of the configurations: every setting not in
      ``hyperparams`` is its. Settings varied here must all be values in its state (a
      learning rate needs a clients' optimizer built with ``optax.inject_hyperparams``); with
      DP on, the send mode decides what is clipped, so it must not vary.
    hyperparams: see :data:`Hyperparams`.
    rounds: each configuration's number of rounds; a configuration's state stays as it is
      after its last round (shorter runs wait, frozen, while longer ones go on), and its
      metrics in later rounds are to be ignored. ``None``: every configuration runs every
      round.

  Returns:
    A :class:`FederatedAlgorithm` whose ``init(key, data)``, ``apply(state, data, key)``,
    ``evaluate`` and ``evaluate_global`` work on every configuration at once: state and metric
    leaves gain a leading ``C`` axis, except the shared ``round`` (:func:`config_axes`).

  Raises:
    SettingError: for a setting the state does not hold as a value.
  """
  for name in hyperparams:
    if name not in (*TRACED, "send"):
      raise SettingError(
        name,
        None,
        "is static (it changes the program's shapes or structure): configurations that differ "
        f"in it need programs of their own; these can vary: send, {', '.join(TRACED)}",
      )
  counts = {len(values) for values in hyperparams.values()} | (
    set() if rounds is None else {len(rounds)}
  )
  if len(counts) != 1:
    raise ValueError(
      "every setting (and rounds) needs one value per configuration; got "
      f"{sorted(counts) or 'no setting and no rounds'}"
    )
  (num_configs,) = counts
  last = None if rounds is None else jnp.asarray(rounds, jnp.int32)

  def stacked(params: Params) -> dict[str, Any]:
    """``hyperparams`` as arrays ``[C]``; ``send`` as stacked masks."""
    out: dict[str, Any] = {}
    for name, values in hyperparams.items():
      if name == "send":
        out[name] = jax.tree.map(
          lambda *masks: jnp.stack(masks), *[send_mask(params, mode) for mode in values]
        )
      else:
        out[name] = jnp.asarray(values)
    return out

  def configured(state: State, values: dict[str, Any]) -> State:
    for name, value in values.items():
      state = state.with_hyperparam(name, value)
    return state

  def init(key: PRNGKey, data: ClientData) -> State:
    values = stacked(clients_state(jax.eval_shape(algorithm.init, key, data)).server_params)
    one = lambda values: configured(algorithm.init(key, data), values)
    first = jax.tree.map(lambda leaf: leaf[0], values)
    axes = config_axes(jax.eval_shape(one, first))
    return jax.vmap(one, out_axes=axes, axis_size=num_configs)(values)

  def apply(state: State, data: ClientData, key: PRNGKey) -> tuple[State, RoundMetrics]:
    def one(state: State, active: jax.Array) -> tuple[State, RoundMetrics]:
      new, metrics = algorithm.apply(state, data, key)
      if last is None:
        return new, metrics
      frozen = jax.tree_util.tree_map_with_path(
        lambda path, n, o: n if _is_round(path) else jnp.where(active, n, o), new, state
      )
      return frozen, metrics

    axes = config_axes(state)
    round_index = clients_state(state).round
    active = jnp.ones(num_configs, bool) if last is None else round_index < last
    return jax.vmap(one, in_axes=(axes, 0), out_axes=(axes, 0))(state, active)

  def evaluate(
    state: State, data: ClientData, part: Part = "test", best: bool = False
  ) -> ErrorSums:
    one = lambda state: algorithm.evaluate(state, data, part, best)
    return jax.vmap(one, in_axes=(config_axes(state),))(state)

  evaluate_global = None
  if algorithm.evaluate_global is not None:
    by_config = algorithm.evaluate_global

    def evaluate_global(state: State, windows: EvalWindows, best: bool = False) -> ErrorSums:
      one = lambda state: by_config(state, windows, best)
      return jax.vmap(one, in_axes=(config_axes(state),))(state)

  return FederatedAlgorithm(init, apply, evaluate, evaluate_global)


def _config_axis(path: Any, seeds_axis: bool) -> int | None:
  """Where the configurations axis of an :func:`over_configs` state's leaf is: none for the
  shared round counter, after the seeds axis for every leaf but the settings (which seeds
  share, :func:`seed_axes`)."""
  if _is_round(path):
    return None
  return 1 if seeds_axis and not _is_hyper(path) else 0


def config_state(state: State, c: int, *, seeds_axis: bool = False) -> State:
  """Configuration ``c`` of an :func:`over_configs` state (or of its round's metrics or
  evaluation), as that configuration run alone would hold it; the shared round counter is
  kept. With ``seeds_axis`` (:func:`over_seeds` on top), leaves are ``[seeds, C, ...]``."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      leaf
      if (axis := _config_axis(path, seeds_axis)) is None
      # Plain indexing: metrics on the host stay numpy, no device op.
      else leaf[(slice(None),) * axis + (c,)]
    ),
    state,
  )


def stack_configs(states: Sequence[State], *, seeds_axis: bool = False) -> State:
  """The :func:`over_configs` state holding ``states``, each a configuration's own state (as
  :func:`config_state` gives it) at the same round: the inverse of :func:`config_state`."""
  return jax.tree_util.tree_map_with_path(
    lambda path, *leaves: (
      leaves[0]
      if (axis := _config_axis(path, seeds_axis)) is None
      else jnp.stack(leaves, axis=axis)
    ),
    states[0],
    *states[1:],
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

  def evaluate(
    state: State, data: ClientData, part: Part = "test", best: bool = False
  ) -> ErrorSums:
    one = lambda state, data: algorithm.evaluate(state, data, part, best)
    return jax.vmap(one, in_axes=(seed_axes(state), None))(state, data)

  evaluate_global = None
  if algorithm.evaluate_global is not None:
    by_seed = algorithm.evaluate_global

    def evaluate_global(state: State, windows: EvalWindows, best: bool = False) -> ErrorSums:
      one = lambda state, windows: by_seed(state, windows, best)
      return jax.vmap(one, in_axes=(seed_axes(state), None))(state, windows)

  return FederatedAlgorithm(init, apply, evaluate, evaluate_global)


def clients_state(state: State) -> ClientsState:
  """The :class:`ClientsState` inside an algorithm's state (FedAvg's is one; FedGen's holds
  one beside the generator)."""
  found = [
    node
    for node in jax.tree.leaves(state, is_leaf=lambda node: isinstance(node, ClientsState))
    if isinstance(node, ClientsState)
  ]
  if len(found) != 1:
    raise TypeError(f"a state with {len(found)} ClientsState parts; expected one")
  return found[0]


def init_clients(
  model: Model,
  optimizer: optax.GradientTransformation,
  config: RoundConfig,
  key: PRNGKey,
  num_clients: int,
) -> ClientsState:
  """Server and every client start from the same initial model, like FedGen's deep copies;
  the state holds ``config``'s :class:`RoundHyperparams`."""
  params = model.init(key)
  clients = stack(params, num_clients)
  return ClientsState(
    server_params=params,
    client_params=clients,
    client_opt_state=stack(optimizer.init(params), num_clients),
    round=jnp.zeros((), jnp.int32),
    selected=Selected(
      clients, params, jnp.array(NOT_VALIDATED, jnp.float32), jnp.array(-1, jnp.int32)
    ),
    hyper=round_hyperparams(config, params),
  )


def evaluate_clients(model: Model, params: StackedParams, windows: EvalWindows) -> ErrorSums:
  """Every client's model on its own ``windows`` (row i is client i's); zeros when there are
  no windows (a run without a validation split), without calling the model."""
  num_clients, num_windows = windows.mask.shape
  if num_windows == 0:
    horizon = windows.y.shape[2]
    return ErrorSums(
      jnp.zeros((num_clients,)), jnp.zeros((num_clients, horizon)), jnp.zeros((num_clients,))
    )
  prediction = jax.vmap(model.apply)(params, windows.x)
  return error_sums(prediction, windows.y, windows.mask)


def deployed_params(state: ClientsState, best: bool = False) -> StackedParams:
  """The models clients would use now (theirs after receiving the server's), or with ``best``
  those chosen on validation."""
  if best:
    return state.selected.client_params
  return received(state)


def received(state: ClientsState) -> StackedParams:
  """Every client's params after taking what the server sends (the state's
  :class:`RoundHyperparams`)."""
  hyper = state.hyper
  return receive_sent(state.server_params, state.client_params, hyper.sent, hyper.beta)


def evaluate_deployed(
  model: Model,
  state: ClientsState,
  data: ClientData,
  part: Part = "test",
  best: bool = False,
) -> ErrorSums:
  """Errors of the deployed models (:func:`deployed_params`) on every client's ``part``
  windows."""
  windows = {"test": data.test, "validation": data.validation}[part]
  return evaluate_clients(model, deployed_params(state, best), windows)


def evaluate_server(
  model: Model, state: ClientsState, windows: EvalWindows, best: bool = False
) -> ErrorSums:
  """The server's model (with ``best``, the one chosen on validation) on every row of
  ``windows``: viewers who never trained."""
  server = state.selected.server_params if best else state.server_params
  return evaluate_clients(model, stack(server, windows.x.shape[0]), windows)


def evaluate_on_schedule(
  model: Model,
  config: RoundConfig,
  params: StackedParams,
  data: ClientData,
  round_index: jax.Array,
) -> tuple[ErrorSums, ErrorSums, jax.Array]:
  """Validation and test errors on rounds ``0, eval_every, 2 * eval_every, ...``; zeros (not
  computed) otherwise."""
  due = round_index % config.eval_every == 0
  evaluate = lambda: (
    evaluate_clients(model, params, data.validation),
    evaluate_clients(model, params, data.test),
  )
  skip = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(evaluate))
  validation, test = jax.lax.cond(due, evaluate, skip)
  return validation, test, due


def select_on_validation(
  state: ClientsState,
  params: StackedParams,
  validation: ErrorSums,
  evaluated: jax.Array,
  has_validation: bool,
) -> Selected:
  """``state.selected``, replaced by this round's deployed ``params`` (and the server's
  model) when they were evaluated and their validation loss is lower. Without validation
  windows (``has_validation`` False) the latest evaluated models are kept, so the selection
  is the final model, and its validation loss stays :data:`NOT_VALIDATED`."""
  loss = summarize(validation).loss if has_validation else jnp.array(NOT_VALIDATED)
  improved = evaluated & (loss < state.selected.validation_loss if has_validation else True)
  candidate = Selected(params, state.server_params, loss, state.round)
  return jax.tree.map(lambda new, old: jnp.where(improved, new, old), candidate, state.selected)


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
    started: the params they started training from, ``f32[K, ...]`` (DP-FedAvg's updates are
      ``trained - started``).
    selected: ``i32[K]``.
    batches: the minibatches they trained on, ``(f32[K, S, B, M, 3], f32[K, S, B, H, 3])``
      (and the label batches, see :func:`train_clients`).
    losses: ``f32[K, S]`` every step's loss.
    finite: ``bool[K]`` clients whose trained params and losses are all finite.
  """

  client_params: StackedParams
  client_opt_state: StackedOptState
  trained: StackedParams
  started: StackedParams
  selected: jax.Array
  batches: tuple[jax.Array, ...]
  losses: jax.Array
  finite: jax.Array


class ClientKeys(NamedTuple):
  """Every training client's keys of one round, ``key[K]`` each (row k is the k-th selected
  client's): what a client needs to draw and train exactly as it would in the vmapped round.

  Attributes:
    batches: its minibatches' key.
    labels: its label batches' key (FedGen).
    train: its local steps' key.
  """

  batches: jax.Array
  labels: jax.Array
  train: jax.Array


def plan_round(
  key: PRNGKey, num_clients: int, clients_per_round: int | None
) -> tuple[jax.Array, ClientKeys]:
  """``(selected, keys)``: the round's training clients (:func:`select_clients`) and their
  :class:`ClientKeys`, all from the round's clients key."""
  select_key, batch_key, train_key = jax.random.split(key, 3)
  selected = select_clients(select_key, num_clients, clients_per_round)
  count = selected.shape[0]
  keys = ClientKeys(
    client_keys(batch_key, count),
    client_keys(jax.random.fold_in(batch_key, 1), count),
    client_keys(train_key, count),
  )
  return selected, keys


def local_training(
  config: RoundConfig,
  update: LocalUpdate,
  params: StackedParams,
  opt_state: StackedOptState,
  data: ClientData,
  clients: jax.Array,
  keys: ClientKeys,
  context: Any = None,
  label_batch_size: int = 0,
) -> tuple[StackedParams, StackedOptState, jax.Array, tuple[jax.Array, ...]]:
  """K clients' local training from ``params`` and ``opt_state`` (leaves ``[K, ...]``), client
  k on row ``clients[k]`` of ``data`` with ``keys`` row k: ``(trained, opt_state, losses
  f32[K, S], batches)``. The vmapped round calls it for every selected client; a deployed
  client (:mod:`fedvp_jax.flower`) for itself alone (K = 1, ``data`` its own windows).

  With ``label_batch_size > 0`` every step's batch also carries that many of the client's own
  final targets, ``f32[K, S, label_batch_size, 3]``, as a third element (FedGen's labels);
  the first two elements are the same as without.
  """
  batches: tuple[jax.Array, ...] = sample_batches(
    keys.batches, data, config.local_steps, config.batch_size, clients
  )
  if label_batch_size:
    labels = sample_final_targets(keys.labels, data, config.local_steps, label_batch_size, clients)
    batches = (*batches, labels)
  trained, trained_opt, losses = update(params, opt_state, batches, keys.train, context)
  return trained, trained_opt, losses, batches


def finite_updates(trained: StackedParams, losses: jax.Array) -> jax.Array:
  """``bool[K]``: clients whose trained params and step losses ``f32[K, S]`` are all finite."""
  return is_finite(trained) & jnp.all(jnp.isfinite(losses), axis=1)


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
  """Selects this round's clients, draws their minibatches and trains them all at once
  (:func:`plan_round`, then :func:`local_training`; ``label_batch_size`` as there)."""
  selected, keys = plan_round(key, data.num_clients, config.clients_per_round)
  # When every row trains (the default, without padding rows) the selection is the identity:
  # skip the gather and scatter, which would copy every client's params and optimizer state.
  everyone = config.clients_per_round in (None, data.num_clients) and not data.padded
  take = lambda tree: tree if everyone else jax.tree.map(lambda leaf: leaf[selected], tree)
  start_params, start_opt = take(params), take(opt_state)
  trained, trained_opt, losses, batches = local_training(
    config, update, start_params, start_opt, data, selected, keys, context, label_batch_size
  )
  finite = finite_updates(trained, losses)

  def put(full: Any, part: Any) -> Any:
    return part if everyone else jax.tree.map(lambda f, p: f.at[selected].set(p), full, part)

  return TrainResult(
    client_params=put(params, where_clients(finite, trained, start_params)),
    client_opt_state=put(opt_state, where_clients(finite, trained_opt, start_opt)),
    trained=trained,
    started=start_params,
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


def aggregate_trained(
  server: Params, trained: StackedParams, losses: jax.Array, finite: jax.Array, counts: jax.Array
) -> tuple[Params, jax.Array, jax.Array]:
  """The server's side of a round: ``(new_server, used, train_loss)`` from K clients' trained
  params (leaves ``f32[K, ...]``), step losses ``f32[K, S]``, :func:`finite_updates` and
  training-sample counts ``f32[K]`` (the aggregation weights; see
  :func:`~fedvp_jax.algorithms.aggregation.aggregate` and :func:`mean_train_loss`)."""
  # A client whose loss diverged is left out even if its params still look finite.
  weights = jnp.where(finite, counts, 0.0)
  server, used = aggregate(server, trained, weights)
  return server, used, mean_train_loss(losses, weights)


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
  params = received(state)
  validation, test, evaluated = evaluate_on_schedule(model, config, params, data, state.round)
  has_validation = data.val_mask.shape[1] > 0
  selected = select_on_validation(state, params, validation, evaluated, has_validation)
  result = train_clients(
    config, update, params, state.client_opt_state, data, key, context, label_batch_size
  )
  server, used, train_loss = aggregate_trained(
    state.server_params,
    result.trained,
    result.losses,
    result.finite,
    data.train_counts[result.selected],
  )
  metrics = RoundMetrics(
    train_loss=train_loss,
    test=test,
    validation=validation,
    evaluated=evaluated,
    selected=result.selected,
    excluded=~used,
  )
  new_state = dataclasses.replace(
    state,
    server_params=server,
    client_params=result.client_params,
    client_opt_state=result.client_opt_state,
    round=state.round + 1,
    selected=selected,
  )
  return ClientsRound(new_state, metrics, result, used)
