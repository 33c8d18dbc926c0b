"""The Flower client's side (the handlers of :data:`fedvp_jax.flower.apps.client_app`): one
client's round of a fedvp_jax algorithm, on its own windows. Flower is imported when a
handler runs, not with this module.

A client is one viewer. Each ``train`` message it receives runs what the vmapped round runs
for that viewer, with the same functions and a clients axis of 1: take what the server sent
(:func:`~fedvp_jax.algorithms.aggregation.receive`, with ``beta``), evaluate the deployed
model on schedule (:func:`~fedvp_jax.algorithms.core.evaluate_on_schedule`), train
(:func:`~fedvp_jax.algorithms.core.local_training` with this client's row of the round's
:class:`~fedvp_jax.algorithms.core.ClientKeys`, sent by the server), and reply with the trained
params, the step losses, the training-sample count, the error sums and, for FedGen, the label
upload (the final targets it trained on). Its own model and optimizer state stay in the node's
``context.state`` between rounds, as in the vmapped state, and so does the model it deployed in
its last evaluated round (``fedvp.candidate``), which becomes its selected model
(``fedvp.selected``) when the server's next message names that round as the one selected on
validation. After the last round an ``evaluate`` message asks for the final model's test and
validation errors, the selected model's test errors and the trivial predictors' (the run's
summary, at the server).

Node config (``--node-config`` of ``flower-supernode``; Flower's simulation sets
``partition-id``):

* ``user``: this client's viewer, or ``partition-id``: its index in the run's users;
* ``data-dir``: the data root with this viewer's traces (default: the run's ``data_dir``); it
  may hold this viewer's trace files only: they are split within the server's catalogue of the
  dataset (:func:`~fedvp_jax.flower.setup.own_data`);
* ``config``: a ``config.json`` this client must run; a server with other settings is refused.

Message contents (record names): ``config`` (ConfigRecord: ``config`` JSON, ``fingerprint``,
``round``, ``users``, ``catalogue`` JSON, ``selected-round``, FedGen's ``alpha`` and
``latent-weight``), ``server`` and ``generator`` (ArrayRecords of params, see
:mod:`fedvp_jax.flower.wire`) and ``keys`` (the client's keys as ``uint32`` key data); replies
carry ``params``, ``upload`` (losses, error sums, points) and ``metrics`` (``num-examples``,
``train-loss``), ``final`` and ``metrics`` (``selected-round``) to ``evaluate``, or ``hello``
(to ``query``: the viewer and its window counts) with ``refused`` when this client will not
join.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from fedvp_jax.algorithms.aggregation import receive, where_clients
from fedvp_jax.algorithms.client import stack
from fedvp_jax.algorithms.core import (
  ClientKeys,
  evaluate_clients,
  evaluate_on_schedule,
  finite_updates,
  local_training,
)
from fedvp_jax.algorithms.fedgen import GeneratorContext, uploaded_points
from fedvp_jax.baselines import BASELINES
from fedvp_jax.config import differences, from_record
from fedvp_jax.data.federated import ClientData
from fedvp_jax.errors import FedVPError
from fedvp_jax.flower.setup import Setup, build_setup, own_data
from fedvp_jax.flower.wire import from_record as arrays_from
from fedvp_jax.flower.wire import to_record
from fedvp_jax.metrics import error_sums

if TYPE_CHECKING:
  from flwr.app import Context, Message

KEY_NAMES = ("batches", "labels", "train")
"""The :class:`~fedvp_jax.algorithms.core.ClientKeys` fields, as the ``keys`` record names."""


def _run_config(msg: Message) -> Any:
  config = msg.content["config"]
  return from_record(json.loads(str(config["config"])))


def _own_config(context: Context) -> Any:
  path = context.node_config.get("config")
  if not path:
    return None
  try:
    return from_record(json.loads(Path(str(path)).read_text()))
  except (OSError, ValueError) as err:
    raise FedVPError(f"node config 'config' {path}: cannot read it: {err}") from err


def refusal(msg: Message, context: Context) -> str | None:
  """Why this client will not run the server's configuration, or ``None``: its own
  ``config`` (node config) differs from the server's in some setting."""
  own = _own_config(context)
  if own is None:
    return None
  server = _run_config(msg)
  changed = differences(own, server)
  if not changed and str(msg.content["config"]["fingerprint"]) == build_setup(own).fingerprint:
    return None
  shown = "; ".join(changed[:4]) or "a different fedvp_jax version"
  return f"this client's config {context.node_config['config']} differs from the server's: {shown}"


def client_user(msg: Message, context: Context) -> str:
  """This client's viewer: node config ``user``, or the run's ``users[partition-id]``."""
  if "user" in context.node_config:
    return str(context.node_config["user"])
  record: Any = msg.content["config"]
  users = [str(u) for u in record["users"]]
  if "partition-id" not in context.node_config:
    raise FedVPError("node config: give this client's 'user' (its viewer) or 'partition-id'")
  index = int(context.node_config["partition-id"])
  if not 0 <= index < len(users):
    raise FedVPError(f"node config partition-id {index}: the run has {len(users)} clients")
  return users[index]


@functools.lru_cache(maxsize=4)
def _data(config_text: str, user: str, data_dir: str | None, known: str) -> ClientData:
  return own_data(from_record(json.loads(config_text)), user, data_dir, json.loads(known))


def client_data(msg: Message, context: Context) -> ClientData:
  """This client's windows: its viewer's traces from its node's ``data-dir``, split within
  the server's catalogue of the dataset (:func:`~fedvp_jax.flower.setup.own_data`)."""
  record: Any = msg.content["config"]
  user = client_user(msg, context)
  return _data(str(record["config"]), user, _data_dir(context), str(record["catalogue"]))


def hello(msg: Message, context: Context) -> Message:
  """The ``query`` handler: answers the server's roll call with this client's viewer and
  training-sample count, or why it refuses the run."""
  from flwr.app import ConfigRecord, Message, RecordDict

  why = refusal(msg, context)
  if why is not None:
    return Message(RecordDict({"hello": ConfigRecord({"refused": why})}), reply_to=msg)
  user = client_user(msg, context)
  data = client_data(msg, context)
  counts = {
    "count": int(np.asarray(data.train_counts)[0]),
    "validation-count": int(np.asarray(data.val_mask).sum()),
    "test-count": int(np.asarray(data.test_counts)[0]),
  }
  return Message(RecordDict({"hello": ConfigRecord({"user": user, **counts})}), reply_to=msg)


def _data_dir(context: Context) -> str | None:
  value = context.node_config.get("data-dir")
  return str(value) if value else None


@functools.lru_cache(maxsize=4)
def client_round(setup: Setup) -> Any:
  """The jitted client side of one round: ``(sent, own, opt_state, data, keys, context,
  round) -> (trained, own, opt_state, losses, validation, test, points, deployed)``,
  everything with a clients axis of 1 except ``sent`` (what the server sent); ``deployed`` is
  the model it evaluated (the server's, received), a candidate for the model selected on
  validation."""
  config = setup.round

  def run(sent, own, opt_state, data, keys, context, round_index):
    params = receive(sent, own, config.send, config.beta)
    validation, test, _ = evaluate_on_schedule(setup.model, config, params, data, round_index)
    clients = jnp.zeros((1,), jnp.int32)
    trained, trained_opt, losses, batches = local_training(
      config, setup.update, params, opt_state, data, clients, keys, context, setup.label_batch_size
    )
    finite = finite_updates(trained, losses)
    own = where_clients(finite, trained, params)
    opt_state = where_clients(finite, trained_opt, opt_state)
    points = uploaded_points(batches) if setup.fedgen is not None else None
    return trained, own, opt_state, losses, validation, test, points, params

  return jax.jit(run)


@functools.lru_cache(maxsize=4)
def client_final(setup: Setup) -> Any:
  """The jitted client side of the run's end: ``(sent, own, earlier, data) -> (test,
  validation, earlier_test, baselines)``: the test and validation errors of the final model
  (the server's last ``sent``, received), the test errors of ``earlier`` (the model selected on
  validation so far) and the trivial predictors' (:data:`~fedvp_jax.baselines.BASELINES`) on
  this client's test windows; ``own`` and ``earlier`` with a clients axis of 1."""
  config, horizon = setup.round, setup.spec.horizon

  def run(sent, own, earlier, data):
    final = receive(sent, own, config.send, config.beta)
    windows = data.test
    baselines = {
      name: error_sums(predict(windows.x, horizon), windows.y, windows.mask)
      for name, predict in BASELINES.items()
    }
    return (
      evaluate_clients(setup.model, final, windows),
      evaluate_clients(setup.model, final, data.validation),
      evaluate_clients(setup.model, earlier, windows),
      baselines,
    )

  return jax.jit(run)


def _keep_selected(config: Any, context: Context) -> None:
  """Makes the candidate (the model this client evaluated in its last evaluated round) its
  selected model when the server's ``selected-round`` (the round whose models validated best,
  :func:`~fedvp_jax.algorithms.core.select_on_validation` at the server) is that round."""
  from flwr.app import ConfigRecord

  rounds: Any = context.state.get("fedvp.rounds")
  if rounds is None:
    return
  candidate = int(rounds["candidate"])
  if int(config["selected-round"]) == candidate:
    context.state["fedvp.selected"] = context.state["fedvp.candidate"]
    context.state["fedvp.rounds"] = ConfigRecord({"candidate": candidate, "selected": candidate})


def _own_state(setup: Setup, context: Context) -> tuple[Any, Any]:
  like = setup.params_like()
  opt_like = jax.eval_shape(setup.optimizer.init, like)
  own = arrays_from(context.state["fedvp.params"], like, "stored params")
  opt_state = arrays_from(context.state["fedvp.opt"], opt_like, "stored optimizer state")
  return own, opt_state


def train(msg: Message, context: Context) -> Message:
  """The ``train`` handler: one round of local training (see the module doc)."""
  from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

  config: Any = msg.content["config"]
  setup = build_setup(_run_config(msg))
  round_index = int(config["round"])
  data = client_data(msg, context)
  first = "fedvp.params" not in context.state
  sent = arrays_from(msg.content["server"], setup.sent_like(first), "server's params")
  if first:
    own, opt_state = sent, setup.optimizer.init(sent)
  else:
    own, opt_state = _own_state(setup, context)
  _keep_selected(config, context)
  key_data: Any = msg.content["keys"]
  keys = ClientKeys(
    *(jax.random.wrap_key_data(jnp.asarray(key_data[n].numpy())[None]) for n in KEY_NAMES)
  )
  gen_context = None
  if setup.fedgen is not None:
    g_like = jax.eval_shape(setup.fedgen.generator.init, jax.random.key(0))
    gen_context = GeneratorContext(
      arrays_from(msg.content["generator"], g_like, "generator's params"),
      jnp.float32(config["alpha"]),
      jnp.float32(config["latent-weight"]),
    )
  trained, own, opt_state, losses, validation, test, points, deployed = client_round(setup)(
    sent, stack(own, 1), stack(opt_state, 1), data, keys, gen_context, round_index
  )
  first_row = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf[0]), tree)
  context.state["fedvp.params"] = to_record(first_row(own))
  context.state["fedvp.opt"] = to_record(first_row(opt_state))
  if round_index % setup.round.eval_every == 0:
    context.state["fedvp.candidate"] = to_record(first_row(deployed))
    rounds: Any = context.state.get("fedvp.rounds")
    selected = -1 if rounds is None else int(rounds["selected"])
    context.state["fedvp.rounds"] = ConfigRecord({"candidate": round_index, "selected": selected})
  upload = {"losses": losses[0], "validation": first_row(validation), "test": first_row(test)}
  if points is not None:
    upload["points"] = points[0]
  count = int(np.asarray(data.train_counts)[0])
  metrics: dict[str, Any] = {"num-examples": count, "train-loss": float(jnp.mean(losses))}
  content = RecordDict(
    {
      "params": to_record(first_row(trained)),
      "upload": to_record(upload),
      "metrics": MetricRecord(metrics),
    }
  )
  return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
  """The ``evaluate`` handler, once after the last round: the final model's test and
  validation errors, the test errors of the model selected before it (per the server's
  ``selected-round``) and the trivial predictors' on this client's test windows (``final``
  record, see :func:`client_final`); ``selected-round`` in its ``metrics``: the round of the
  model it holds as selected (-1: none)."""
  from flwr.app import Message, MetricRecord, RecordDict

  config: Any = msg.content["config"]
  setup = build_setup(_run_config(msg))
  data = client_data(msg, context)
  if "fedvp.params" not in context.state:
    raise FedVPError("evaluate: this client never trained in this run")
  sent = arrays_from(msg.content["server"], setup.sent_like(False), "server's params")
  own, _ = _own_state(setup, context)
  _keep_selected(config, context)
  earlier = own
  rounds: Any = context.state.get("fedvp.rounds")
  held = -1 if rounds is None else int(rounds["selected"])
  if held >= 0:
    earlier = arrays_from(context.state["fedvp.selected"], setup.params_like(), "selected params")
  test, validation, earlier_test, baselines = client_final(setup)(
    sent, stack(own, 1), stack(earlier, 1), data
  )
  first_row = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf[0]), tree)
  final = {
    "test": first_row(test),
    "validation": first_row(validation),
    "earlier-test": first_row(earlier_test),
    "baselines": first_row(baselines),
  }
  content = RecordDict(
    {"final": to_record(final), "metrics": MetricRecord({"selected-round": held})}
  )
  return Message(content, reply_to=msg)


__all__ = [
  "KEY_NAMES",
  "client_data",
  "client_final",
  "client_round",
  "client_user",
  "evaluate",
  "hello",
  "refusal",
  "train",
]
