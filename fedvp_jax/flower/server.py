"""The Flower server's side: a fedvp_jax run's server over Flower's ``Grid`` (the main of
:data:`fedvp_jax.flower.apps.server_app`). Flower is imported when it runs, not with this
module.

The server draws the run's keys as the vmapped rounds do (:func:`~fedvp_jax.rounds.seed_keys`,
:func:`~fedvp_jax.rounds.round_key`, :func:`~fedvp_jax.algorithms.core.plan_round`), sends each
selected client its model (all, the head, or nothing after the first round, per ``send``),
its row of the round's keys and, for FedGen, the generator and its weights
(:func:`~fedvp_jax.algorithms.fedgen.generator_weights`); it aggregates the replies with
:func:`~fedvp_jax.algorithms.core.aggregate_trained`, trains FedGen's generator on the uploaded
labels' heatmaps (:func:`~fedvp_jax.algorithms.dp.uploaded_heatmaps`, ``train_generator`` of
:class:`~fedvp_jax.algorithms.fedgen.FedGenParts`) and reports each round as the vmapped rounds
do (:func:`~fedvp_jax.summaries.round_record`), plus ``missing_clients``: selected clients
whose reply never came (a failed or unreachable node), left out of that round, and
``seconds``, the round's wall time at the server.

Before the first round a roll call (a ``query`` message) learns which node is which viewer
and stops the run when a client refuses the server's configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from fedvp_jax.algorithms import dp
from fedvp_jax.algorithms.core import (
  RoundMetrics,
  aggregate_trained,
  finite_updates,
  plan_round,
)
from fedvp_jax.algorithms.fedgen import generator_weights
from fedvp_jax.config import RunConfig, from_record
from fedvp_jax.errors import FedVPError
from fedvp_jax.flower.client import KEY_NAMES
from fedvp_jax.flower.setup import Setup, build_setup, config_json, run_users
from fedvp_jax.flower.wire import from_record as arrays_from
from fedvp_jax.flower.wire import named_arrays, to_record
from fedvp_jax.metrics import ErrorSums
from fedvp_jax.rounds import round_key, seed_keys
from fedvp_jax.summaries import round_record

if TYPE_CHECKING:
  from flwr.app import Context
  from flwr.serverapp import Grid

logger = logging.getLogger(__name__)


class RefusedError(FedVPError):
  """A client refused the server's configuration, or is not one of the run's viewers."""


@dataclasses.dataclass
class ServerResult:
  """What a Flower run ends with.

  Attributes:
    params: the server's final model.
    generator: FedGen's final generator params (``None`` for the FedAvg family).
    records: every round's record (:func:`~fedvp_jax.summaries.round_record`,
      ``missing_clients`` and ``seconds``).
    users: the run's viewers, client i being ``users[i]``.
  """

  params: Any
  generator: Any
  records: list[dict[str, Any]]
  users: tuple[str, ...]


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
  """The ids of ``count`` connected nodes, waiting up to ``timeout`` seconds for them."""
  deadline = time.monotonic() + timeout
  while True:
    nodes = sorted(grid.get_node_ids())
    if len(nodes) >= count:
      return nodes
    if time.monotonic() > deadline:
      raise FedVPError(
        f"only {len(nodes)} of the run's {count} clients connected within {timeout:.0f} s"
      )
    time.sleep(0.5)


def _base_config(setup: Setup, users: tuple[str, ...]) -> dict[str, Any]:
  return {
    "config": config_json(setup.config),
    "fingerprint": setup.fingerprint,
    "users": list(users),
  }


def roll_call(grid: Grid, setup: Setup, users: tuple[str, ...], nodes: list[int]) -> dict[int, int]:
  """``{node id: client index}`` of every node, from their answers to a ``query``.

  Raises:
    RefusedError: a client refused the configuration, is no viewer of the run, or two nodes
      claim the same viewer.
  """
  from flwr.app import ConfigRecord, Message, RecordDict

  base = _base_config(setup, users)
  messages = [
    Message(RecordDict({"config": ConfigRecord(base)}), dst_node_id=node, message_type="query")
    for node in nodes
  ]
  client_of: dict[int, int] = {}
  for reply in grid.send_and_receive(messages):
    node = reply.metadata.src_node_id
    if reply.has_error():
      raise RefusedError(f"client node {node} failed the roll call: {reply.error.reason}")
    hello: Any = reply.content["hello"]
    if "refused" in hello:
      raise RefusedError(f"client node {node} refused the run: {hello['refused']}")
    user = str(hello["user"])
    if user not in users:
      raise RefusedError(f"client node {node} is viewer {user!r}, not one of the run's {users}")
    if users.index(user) in client_of.values():
      raise RefusedError(f"two client nodes are viewer {user!r}")
    client_of[node] = users.index(user)
  absent = [u for i, u in enumerate(users) if i not in client_of.values()]
  if absent:
    raise FedVPError(f"no client node answered for viewer(s) {', '.join(absent)}")
  return client_of


def upload_like(setup: Setup) -> dict[str, Any]:
  """Shapes of a client's ``upload`` record."""
  config, horizon = setup.round, setup.spec.horizon
  scalar: Any = jax.ShapeDtypeStruct((), jnp.float32)
  steps: Any = jax.ShapeDtypeStruct((horizon,), jnp.float32)
  sums = ErrorSums(scalar, steps, scalar)
  like: dict[str, Any] = {
    "losses": jax.ShapeDtypeStruct((config.local_steps,), jnp.float32),
    "validation": sums,
    "test": sums,
  }
  if setup.fedgen is not None:
    like["points"] = jax.ShapeDtypeStruct((config.local_steps * config.batch_size, 3), jnp.float32)
  return like


@functools.lru_cache(maxsize=4)
def _server_steps(setup: Setup) -> tuple[Any, Any]:
  aggregate = jax.jit(
    lambda server, trained, losses, counts: aggregate_trained(
      server, trained, losses, finite_updates(trained, losses), counts
    )
  )
  if setup.fedgen is None:
    return aggregate, None
  parts = setup.fedgen

  def generator_step(g_params, g_opt, heads, usable, points, key, server_key):
    heat = dp.uploaded_heatmaps(points, parts.upload, jax.random.fold_in(key, dp.HEATMAP_NOISE))
    return parts.train_generator(g_params, g_opt, heads, usable, heat, server_key)

  return aggregate, jax.jit(generator_step)


def run_server(
  grid: Grid,
  config: RunConfig,
  *,
  connect_timeout: float = 120.0,
  round_timeout: float | None = None,
) -> ServerResult:
  """Runs ``config``'s rounds with the clients behind ``grid`` (see the module doc).

  Args:
    grid: Flower's grid of connected client nodes.
    config: the run; every client must be one of its viewers.
    connect_timeout: seconds to wait for every client to connect.
    round_timeout: seconds to wait for a round's replies (``None``: until every selected
      node has answered or failed).

  Raises:
    RefusedError, FedVPError: see :func:`roll_call`, :func:`wait_for_nodes`.
  """
  from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

  setup = build_setup(config)
  users = run_users(config)
  num_clients = len(users)
  setup.round.check_clients(num_clients)
  client_of = roll_call(grid, setup, users, wait_for_nodes(grid, num_clients, connect_timeout))
  node_of = {client: node for node, client in client_of.items()}
  aggregate, generator_step = _server_steps(setup)
  upload_shapes = upload_like(setup)

  init_key, rounds_key = seed_keys(config.seed)
  g_params = g_opt = None
  model_key = init_key
  if setup.fedgen is not None:  # as fedgen()'s init
    model_key, g_key = jax.random.split(init_key)
    g_params = setup.fedgen.generator.init(g_key)
    g_opt = setup.fedgen.g_optimizer.init(g_params)
  server = setup.model.init(model_key)
  base = _base_config(setup, users)
  records = []
  for r in range(config.total_rounds):
    started = time.perf_counter()
    key = round_key(rounds_key, r)
    clients_key, server_key = jax.random.split(key) if setup.fedgen else (key, None)
    chosen, keys = plan_round(clients_key, num_clients, setup.round.clients_per_round)
    selected = [int(c) for c in np.asarray(chosen)]
    sent = {name: server[name] for name in setup.sent_like(r == 0)}
    round_config = {**base, "round": r}
    shared: dict[str, Any] = {"server": to_record(sent)}
    if setup.fedgen is not None:
      alpha, latent_weight = generator_weights(config.fedgen, jnp.asarray(r))
      round_config |= {"alpha": float(alpha), "latent-weight": float(latent_weight)}
      shared["generator"] = to_record(g_params)
    messages = []
    for k, client in enumerate(selected):
      key_record = ArrayRecord(
        {
          **to_record({n: jax.random.key_data(getattr(keys, n)[k]) for n in KEY_NAMES}),
        }
      )
      content = RecordDict({"config": ConfigRecord(round_config), "keys": key_record, **shared})
      messages.append(
        Message(content, dst_node_id=node_of[client], message_type="train", group_id=str(r))
      )
    replies = {}
    for reply in grid.send_and_receive(messages, timeout=round_timeout):
      node = reply.metadata.src_node_id
      if reply.has_error():
        logger.warning("round %d: client node %d failed: %s", r, node, reply.error.reason)
        continue
      replies[client_of[node]] = reply
    answered = [c for c in selected if c in replies]
    missing = [c for c in selected if c not in replies]
    if not answered:
      raise FedVPError(f"round {r}: no selected client replied (clients {missing})")
    like = setup.params_like()
    stacked = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    trained = stacked(
      [arrays_from(replies[c].content["params"], like, "trained params") for c in answered]
    )
    uploads = stacked(
      [arrays_from(replies[c].content["upload"], upload_shapes, "upload") for c in answered]
    )
    metric_records: list[Any] = [replies[c].content["metrics"] for c in answered]
    counts = jnp.asarray([float(m["num-examples"]) for m in metric_records], jnp.float32)
    previous = server
    server, used, train_loss = aggregate(server, trained, uploads["losses"], counts)
    extra = {}
    if generator_step is not None:
      g_params, g_opt, teacher, diversity = generator_step(
        g_params, g_opt, trained, used, uploads["points"], key, server_key
      )
      extra = {"generator_weight": alpha, "teacher_loss": teacher, "diversity_loss": diversity}
    del previous
    metrics = RoundMetrics(
      train_loss=train_loss,
      test=uploads["test"],
      validation=uploads["validation"],
      evaluated=jnp.asarray(r % setup.round.eval_every == 0),
      selected=jnp.asarray(answered),
      excluded=~used,
      extra=extra,
    )
    record = {
      **round_record(r, jax.device_get(metrics)),
      "missing_clients": missing,
      "seconds": time.perf_counter() - started,
    }
    records.append(record)
    logger.info("round %d: %s", r, json.dumps(record))
  return ServerResult(server, g_params, records, users)


def write_result(result: ServerResult, out: Path) -> None:
  """Writes ``result`` into the folder ``out``: ``records.json`` (the rounds' records and the
  users) and ``params.npz`` (the server's model by tree path; the generator's under
  ``generator/``), each written whole before it is renamed into place."""
  out.mkdir(parents=True, exist_ok=True)
  arrays = named_arrays(result.params)
  if result.generator is not None:
    arrays |= {f"generator/{n}": a for n, a in named_arrays(result.generator).items()}
  partial = out / "params.npz.partial"
  with partial.open("wb") as f:
    np.savez(f, **arrays)  # type: ignore[arg-type]
  partial.replace(out / "params.npz")
  text = json.dumps({"users": list(result.users), "records": result.records}, indent=1)
  partial = out / "records.json.partial"
  partial.write_text(text)
  partial.replace(out / "records.json")


def main(grid: Grid, context: Context) -> None:
  """The deployed server (:data:`fedvp_jax.flower.apps.server_app`'s main). Its run config:
  ``config`` (a ``config.json`` path), ``out`` (the folder for :func:`write_result`), optional
  ``round-timeout`` and ``connect-timeout`` (seconds). A :class:`FedVPError` is also written
  to ``out/error.txt``, for the serving command to print."""
  run = context.run_config
  if "config" not in run or "out" not in run:
    raise FedVPError("run config: give 'config' (a config.json) and 'out' (a result folder)")
  out = Path(str(run["out"]))
  timeout = float(run["round-timeout"]) if "round-timeout" in run else None
  try:
    config = from_record(json.loads(Path(str(run["config"])).read_text()))
    result = run_server(
      grid,
      config,
      connect_timeout=float(run.get("connect-timeout", 120.0)),
      round_timeout=timeout,
    )
  except FedVPError as err:  # the serving command reads it and prints it as one line
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").write_text(f"{err}\n")
    raise
  write_result(result, out)


__all__ = [
  "RefusedError",
  "ServerResult",
  "main",
  "roll_call",
  "run_server",
  "upload_like",
  "wait_for_nodes",
  "write_result",
]
