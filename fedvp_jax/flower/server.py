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
and stops the run when a client refuses the server's configuration. Every message carries the
dataset's catalogue (:func:`~fedvp_jax.flower.setup.catalogue`): a client holding only its
own viewer's traces splits them as the vmapped run does.

The server keeps the models selected on validation as the vmapped rounds do
(:func:`~fedvp_jax.algorithms.core.select_on_validation`, on a
:class:`~fedvp_jax.algorithms.core.ClientsState` holding the server's model; each client keeps
its own row and is told the selected round). After the last round an ``evaluate`` message asks
every client for its final and selected models' test errors and the trivial predictors'; the
server evaluates its models on the viewers who are not clients (the new viewers), as
``fedvp train`` does. With an ``out`` folder the run leaves a run directory as ``fedvp train``
does (:class:`~fedvp_jax.rundir.RunDir`: ``config.json`` first, every round's record in
``seed<k>/metrics.jsonl`` as it ends, ``baselines.json``, ``seed<k>/summary.json``, the final
``params.npz`` and, last, ``summary.json``, :func:`~fedvp_jax.summaries.run_summary`'s).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from fedvp_jax.algorithms import dp
from fedvp_jax.algorithms.core import (
  NOT_VALIDATED,
  ClientsState,
  RoundMetrics,
  Selected,
  aggregate_trained,
  evaluate_server,
  finite_updates,
  plan_round,
  select_on_validation,
)
from fedvp_jax.algorithms.fedgen import generator_weights
from fedvp_jax.config import RunConfig, from_record, to_record
from fedvp_jax.data.protocols import new_viewer_windows
from fedvp_jax.errors import ConfigError, FedVPError
from fedvp_jax.experiment import baseline_summaries
from fedvp_jax.flower.client import KEY_NAMES
from fedvp_jax.flower.setup import Setup, build_setup, catalogue, config_json, run_dataset
from fedvp_jax.flower.wire import from_record as arrays_from
from fedvp_jax.flower.wire import named_arrays
from fedvp_jax.flower.wire import to_record as arrays_record
from fedvp_jax.metrics import ErrorSums, summarize
from fedvp_jax.rounds import round_key, seed_keys
from fedvp_jax.rundir import RunDir
from fedvp_jax.summaries import models_summary, round_record, run_summary, summary_dict

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
    summary: the run's summary (:func:`~fedvp_jax.summaries.run_summary`, as ``fedvp train``
      writes it to ``summary.json``); its seed's ``missing_clients`` are the clients whose
      final evaluation never came (left out of the final and selected models' errors).
    selected: the server's part of the models selected on validation
      (:class:`~fedvp_jax.algorithms.core.Selected`; ``client_params`` is ``None``: each client
      holds its own).
  """

  params: Any
  generator: Any
  records: list[dict[str, Any]]
  users: tuple[str, ...]
  summary: dict[str, Any]
  selected: Selected


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


def _base_config(setup: Setup, users: tuple[str, ...], known: dict[str, Any]) -> dict[str, Any]:
  return {
    "config": config_json(setup.config),
    "fingerprint": setup.fingerprint,
    "users": list(users),
    "catalogue": json.dumps(known),
  }


def roll_call(
  grid: Grid, setup: Setup, users: tuple[str, ...], nodes: list[int], known: dict[str, Any]
) -> tuple[dict[int, int], dict[str, list[int]]]:
  """``{node id: client index}`` of every node, from their answers to a ``query``, and the
  clients' ``train``, ``validation`` and ``test`` window counts (client i's at index i).

  Raises:
    RefusedError: a client refused the configuration, is no viewer of the run, or two nodes
      claim the same viewer.
  """
  from flwr.app import ConfigRecord, Message, RecordDict

  base = _base_config(setup, users, known)
  messages = [
    Message(RecordDict({"config": ConfigRecord(base)}), dst_node_id=node, message_type="query")
    for node in nodes
  ]
  client_of: dict[int, int] = {}
  names = {"train": "count", "validation": "validation-count", "test": "test-count"}
  counts: dict[str, list[int]] = {part: [0] * len(users) for part in names}
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
    client = client_of[node] = users.index(user)
    for part, name in names.items():
      counts[part][client] = int(hello[name])
  absent = [u for i, u in enumerate(users) if i not in client_of.values()]
  if absent:
    raise FedVPError(f"no client node answered for viewer(s) {', '.join(absent)}")
  return client_of, counts


def upload_like(setup: Setup) -> dict[str, Any]:
  """Shapes of a client's ``upload`` record."""
  config = setup.round
  sums = _sums_like(setup)
  like: dict[str, Any] = {
    "losses": jax.ShapeDtypeStruct((config.local_steps,), jnp.float32),
    "validation": sums,
    "test": sums,
  }
  if setup.fedgen is not None:
    like["points"] = jax.ShapeDtypeStruct((config.local_steps * config.batch_size, 3), jnp.float32)
  return like


def final_like(setup: Setup) -> dict[str, Any]:
  """Shapes of a client's ``final`` record (:func:`~fedvp_jax.flower.client.evaluate`)."""
  from fedvp_jax.baselines import BASELINES

  sums = _sums_like(setup)
  return {
    "test": sums,
    "validation": sums,
    "earlier-test": sums,
    "baselines": {name: sums for name in BASELINES},
  }


def _sums_like(setup: Setup) -> ErrorSums:
  scalar: Any = jax.ShapeDtypeStruct((), jnp.float32)
  steps: Any = jax.ShapeDtypeStruct((setup.spec.horizon,), jnp.float32)
  return ErrorSums(scalar, steps, scalar)


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


def _select(
  selected: Selected, server: Any, r: int, validation: ErrorSums, evaluated: bool, has: bool
) -> Selected:
  """The vmapped rounds' selection on validation (``select_on_validation``) of the server's
  part: ``server`` is the model at the start of round ``r``; clients keep their own rows."""
  # Selection reads no settings held as values, so the state carries none.
  state = ClientsState(server, None, None, jnp.asarray(r, jnp.int32), selected, None)  # type: ignore[arg-type]
  return select_on_validation(state, None, validation, jnp.asarray(evaluated), has)


def _stacked(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _send(grid: Grid, messages: list[Any], timeout: float | None) -> dict[int, Any]:
  """The replies to ``messages`` by node (failed ones logged and left out)."""
  replies = {}
  for reply in grid.send_and_receive(messages, timeout=timeout):
    node = reply.metadata.src_node_id
    if reply.has_error():
      logger.warning("client node %d failed: %s", node, reply.error.reason)
      continue
    replies[node] = reply
  return replies


def run_server(
  grid: Grid,
  config: RunConfig,
  *,
  connect_timeout: float = 120.0,
  round_timeout: float | None = None,
  out: Path | None = None,
) -> ServerResult:
  """Runs ``config``'s rounds with the clients behind ``grid`` (see the module doc).

  Args:
    grid: Flower's grid of connected client nodes.
    config: the run; every client must be one of its viewers.
    connect_timeout: seconds to wait for every client to connect.
    round_timeout: seconds to wait for a round's replies (``None``: until every selected
      node has answered or failed).
    out: the run directory to write (see the module doc); it must not be one already.

  Raises:
    RefusedError, FedVPError: see :func:`roll_call`, :func:`wait_for_nodes`; a ConfigError
      for an ``out`` that is a run directory already.
  """
  setup = build_setup(config)
  traces, users = run_dataset(config)
  num_clients = len(users)
  setup.round.check_clients(num_clients)
  if setup.round.clients_per_round not in (None, num_clients):
    raise ConfigError(
      "clients_per_round: the Flower apps train every client every round; leave it unset"
    )
  target = None if out is None else _new_run_dir(out)
  known = catalogue(traces)
  nodes = wait_for_nodes(grid, num_clients, connect_timeout)
  client_of, counts = roll_call(grid, setup, users, nodes, known)
  new_users: tuple[str, ...] = ()
  new_windows = None
  if setup.round.send == "full":  # as the vmapped algorithms' evaluate_global
    new_users, new_windows = new_viewer_windows(
      config.protocol, traces, setup.spec, users, config.split, config.seed
    )
  del traces
  if target is None:
    return _run(grid, setup, users, client_of, known, round_timeout, None, new_windows)
  with target.lock():
    target.write_config(_config_record(setup, users, counts, new_users))
    return _run(grid, setup, users, client_of, known, round_timeout, target, new_windows)


def _new_run_dir(out: Path) -> RunDir:
  target = RunDir(out)
  if target.exists():
    raise ConfigError(f"run directory {out} already exists; choose another output folder")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise ConfigError(f"cannot create run directory {out}: {err}") from err
  return target


def _config_record(
  setup: Setup, users: tuple[str, ...], counts: dict[str, list[int]], new_users: tuple[str, ...]
) -> dict[str, Any]:
  """``config.json``, with the keys ``fedvp train`` writes, and ``engine``: ``flower``."""
  import flax
  import flwr
  import optax

  return {
    "config": to_record(setup.config),
    "checkpoint_every": None,
    "dataset": str(setup.spec),
    "users": list(users),
    **{f"{part}_windows": count for part, count in counts.items()},
    "new_viewers": list(new_users),
    "versions": {
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "flwr": flwr.__version__,
    },
    "device": str(jax.devices()[0]),
    "engine": "flower",
  }


def _run(
  grid: Grid,
  setup: Setup,
  users: tuple[str, ...],
  client_of: dict[int, int],
  known: dict[str, Any],
  round_timeout: float | None,
  target: RunDir | None,
  new_windows: Any,
) -> ServerResult:
  from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

  config = setup.config
  num_clients = len(users)
  node_of = {client: node for node, client in client_of.items()}
  aggregate, generator_step = _server_steps(setup)
  upload_shapes = upload_like(setup)
  has_validation = config.validation_fraction > 0

  init_key, rounds_key = seed_keys(config.seed)
  g_params = g_opt = None
  model_key = init_key
  if setup.fedgen is not None:  # as fedgen()'s init
    model_key, g_key = jax.random.split(init_key)
    g_params = setup.fedgen.generator.init(g_key)
    g_opt = setup.fedgen.g_optimizer.init(g_params)
  server = setup.model.init(model_key)
  selected = Selected(None, server, jnp.array(NOT_VALIDATED, jnp.float32), jnp.array(-1, jnp.int32))
  base = _base_config(setup, users, known)
  records: list[dict[str, Any]] = []
  metrics_file = None if target is None else target.open_metrics(config.seed, [])
  started_run = time.perf_counter()
  try:
    for r in range(config.total_rounds):
      started = time.perf_counter()
      key = round_key(rounds_key, r)
      clients_key, server_key = jax.random.split(key) if setup.fedgen else (key, None)
      picked, keys = plan_round(clients_key, num_clients, setup.round.clients_per_round)
      selected_clients = [int(c) for c in np.asarray(picked)]
      sent = {name: server[name] for name in setup.sent_like(r == 0)}
      round_config = {**base, "round": r, "selected-round": int(selected.from_round)}
      shared: dict[str, Any] = {"server": arrays_record(sent)}
      if setup.fedgen is not None:
        alpha, latent_weight = generator_weights(config.fedgen, jnp.asarray(r))
        round_config |= {"alpha": float(alpha), "latent-weight": float(latent_weight)}
        shared["generator"] = arrays_record(g_params)
      messages = []
      for k, client in enumerate(selected_clients):
        key_record = ArrayRecord(
          {**arrays_record({n: jax.random.key_data(getattr(keys, n)[k]) for n in KEY_NAMES})}
        )
        content = RecordDict({"config": ConfigRecord(round_config), "keys": key_record, **shared})
        messages.append(
          Message(content, dst_node_id=node_of[client], message_type="train", group_id=str(r))
        )
      by_node = _send(grid, messages, round_timeout)
      replies = {client_of[node]: reply for node, reply in by_node.items()}
      answered = [c for c in selected_clients if c in replies]
      missing = [c for c in selected_clients if c not in replies]
      if not answered:
        raise FedVPError(f"round {r}: no selected client replied (clients {missing})")
      like = setup.params_like()
      trained = _stacked(
        [arrays_from(replies[c].content["params"], like, "trained params") for c in answered]
      )
      uploads = _stacked(
        [arrays_from(replies[c].content["upload"], upload_shapes, "upload") for c in answered]
      )
      metric_records: list[Any] = [replies[c].content["metrics"] for c in answered]
      counts = jnp.asarray([float(m["num-examples"]) for m in metric_records], jnp.float32)
      evaluated = r % setup.round.eval_every == 0
      selected = _select(selected, server, r, uploads["validation"], evaluated, has_validation)
      server, used, train_loss = aggregate(server, trained, uploads["losses"], counts)
      extra = {}
      if generator_step is not None:
        g_params, g_opt, teacher, diversity = generator_step(
          g_params, g_opt, trained, used, uploads["points"], key, server_key
        )
        extra = {"generator_weight": alpha, "teacher_loss": teacher, "diversity_loss": diversity}
      metrics = RoundMetrics(
        train_loss=train_loss,
        test=uploads["test"],
        validation=uploads["validation"],
        evaluated=jnp.asarray(evaluated),
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
      if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
      logger.info("round %d: %s", r, json.dumps(record))
  finally:
    if metrics_file is not None:
      metrics_file.close()

  summary, seed_summary, baselines, chosen = _final(
    grid, setup, client_of, base, round_timeout, server, selected, new_windows, records
  )
  seed_summary["wall_seconds"] = time.perf_counter() - started_run  # summary["seeds"][0]
  result = ServerResult(server, g_params, records, users, summary, chosen)
  if target is not None:
    target.write_baselines(baselines)
    target.write_seed_summary(seed_summary)
    write_params(result, target.path)
    target.write_summary(summary)  # last: the run directory is finished
  return result


def _final(
  grid: Grid,
  setup: Setup,
  client_of: dict[int, int],
  base: dict[str, Any],
  round_timeout: float | None,
  server: Any,
  selected: Selected,
  new_windows: Any,
  records: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Selected]:
  """The run's end: every client's final and selected models' errors (an ``evaluate``
  message), the last selection step, and the run's summary, its seed's and the baselines."""
  from flwr.app import ConfigRecord, Message, RecordDict

  config = setup.config
  num_clients = len(client_of)
  node_of = {client: node for node, client in client_of.items()}
  has_validation = config.validation_fraction > 0
  done = config.total_rounds
  final_config = {**base, "round": done, "selected-round": int(selected.from_round)}
  sent = {name: server[name] for name in setup.sent_like(False)}
  messages = [
    Message(
      RecordDict({"config": ConfigRecord(final_config), "server": arrays_record(sent)}),
      dst_node_id=node_of[client],
      message_type="evaluate",
      group_id=str(done),
    )
    for client in range(num_clients)
  ]
  by_node = _send(grid, messages, round_timeout)
  shapes = final_like(setup)
  finals = {}
  for node, reply in sorted(by_node.items()):
    held = int(reply.content["metrics"]["selected-round"])
    if held != int(selected.from_round):
      logger.warning(
        "client %d holds round %d's model as selected, not round %d: left out of the summary",
        client_of[node],
        held,
        int(selected.from_round),
      )
      continue
    finals[client_of[node]] = arrays_from(reply.content["final"], shapes, "final evaluation")
  missing = [c for c in range(num_clients) if c not in finals]
  if not finals:
    raise FedVPError("no client answered the final evaluation")
  if missing:
    logger.warning("clients %s: no final evaluation; the summary leaves them out", missing)
  final = _stacked([finals[c] for c in sorted(finals)])
  final_validation = float(summarize(final["validation"]).loss) if has_validation else math.nan
  # The final models were never validated inside a round: one more selection step picks them
  # unless an earlier round validated better, as the vmapped run's end does (on an exact tie
  # of the two validation losses that end picks the final models, this step the earlier ones).
  chosen = _select(selected, server, done, final["validation"], True, has_validation)
  is_final = int(chosen.from_round) == done
  summary_entry = models_summary(
    final["test"],
    final_validation,
    int(chosen.from_round),
    float(chosen.validation_loss) if has_validation else math.nan,
    final["test"] if is_final else final["earlier-test"],
  )
  if new_windows is not None:
    on_new = lambda best: evaluate_server(
      setup.model,
      ClientsState(server, None, None, jnp.asarray(done), chosen, None),  # type: ignore[arg-type]
      new_windows,
      best,
    )
    summary_entry["new_viewers"] = {
      "viewers": int(new_windows.x.shape[0]),
      "baselines": {
        name: summary_dict(v)
        for name, v in baseline_summaries(new_windows, setup.spec.horizon).items()
      },
      "final": summary_dict(summarize(on_new(False))),
      "selected": summary_dict(summarize(on_new(True))),
    }
  times = [record["seconds"] for record in records]
  seed_summary = {
    "seed": config.seed,
    "rounds": done,
    "stopped_early": False,
    **summary_entry,
    "first_round_seconds": times[0] if times else None,
    "median_round_seconds": float(np.median(times[1:])) if len(times) > 1 else None,
    "wall_seconds": None,
    "seeds_together": 1,
    "missing_clients": missing,
  }
  baselines = {name: summary_dict(summarize(sums)) for name, sums in final["baselines"].items()}
  summary = run_summary(to_record(config), baselines, [seed_summary])
  return summary, seed_summary, baselines, chosen


def write_params(result: ServerResult, out: Path) -> None:
  """Writes ``out/params.npz``, written whole before it is renamed into place: the server's
  final model by tree path, its model selected on validation under ``selected/`` and FedGen's
  generator under ``generator/``."""
  arrays = named_arrays(result.params)
  arrays |= {f"selected/{n}": a for n, a in named_arrays(result.selected.server_params).items()}
  if result.generator is not None:
    arrays |= {f"generator/{n}": a for n, a in named_arrays(result.generator).items()}
  partial = out / "params.npz.partial"
  with partial.open("wb") as f:
    np.savez(f, **arrays)  # type: ignore[arg-type]
  partial.replace(out / "params.npz")


def main(grid: Grid, context: Context) -> None:
  """The deployed server (:data:`fedvp_jax.flower.apps.server_app`'s main). Its run config:
  ``config`` (the run's settings, a ``config.json`` of :func:`~fedvp_jax.config.to_record`),
  ``out`` (the run directory, see :func:`run_server`), optional ``round-timeout`` and
  ``connect-timeout`` (seconds). A :class:`FedVPError` is also written to ``out/error.txt``,
  for the serving command to print."""
  run = context.run_config
  if "config" not in run or "out" not in run:
    raise FedVPError("run config: give 'config' (the run's settings) and 'out' (a run folder)")
  out = Path(str(run["out"]))
  timeout = float(run["round-timeout"]) if "round-timeout" in run else None
  try:
    config = from_record(json.loads(Path(str(run["config"])).read_text()))
    run_server(
      grid,
      config,
      connect_timeout=float(run.get("connect-timeout", 120.0)),
      round_timeout=timeout,
      out=out,
    )
  except FedVPError as err:  # the serving command reads it and prints it as one line
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").write_text(f"{err}\n")
    raise


__all__ = [
  "RefusedError",
  "ServerResult",
  "final_like",
  "main",
  "roll_call",
  "run_server",
  "upload_like",
  "wait_for_nodes",
  "write_params",
]
