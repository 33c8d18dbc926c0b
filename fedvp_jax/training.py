"""The run loop: data, model and algorithm from a :class:`RunConfig`, rounds, evaluation,
progress, and a run directory holding the config, per-round metrics and a summary.

A run directory ``<out>/<name>/`` holds::

    config.json      the resolved configuration, the clients, library versions, the device
    baselines.json   no-motion and constant-velocity errors on the same test windows
    seed<k>/metrics.jsonl   one JSON line per round, for every seed k of --times; round r's
                     test_* are of the models deployed at the start of round r (after r
                     aggregations), as in FedGen's code; non-finite numbers are null
    seed<k>/summary.json    final and best Average Global Loss, orthodromic error, timings
    checkpoints/     with checkpoint_every: orbax checkpoints of the whole state of every seed
    summary.json     the seeds' final metrics, mean and std

An existing run directory is never written into unless ``overwrite`` is set, or by
:func:`resume`, which continues an interrupted run from its checkpoints.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from fedvp_jax.algorithms import ALGORITHMS, FedGenConfig, build_algorithm
from fedvp_jax.algorithms.core import FederatedAlgorithm, RoundConfig, over_seeds
from fedvp_jax.baselines import BASELINES
from fedvp_jax.data.datasets import DatasetSpec, load_traces, parse_spec
from fedvp_jax.data.federated import ClientData, build_client_data, select_users
from fedvp_jax.data.windows import SPLITS
from fedvp_jax.errors import ConfigError, DivergenceError
from fedvp_jax.metrics import Summary, error_sums, summarize
from fedvp_jax.models import MODELS, build_model
from fedvp_jax.sharding import client_mesh, shard_data, shard_state, state_shardings
from fedvp_jax.types import PRNGKey

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run. Field names match the command-line flags.

  Attributes:
    algo: one of :data:`fedvp_jax.algorithms.ALGORITHMS`.
    dataset: ``<Name>-m<M>-h<H>``.
    data_dir: the data root (``$FEDVP_DATA`` when ``None``).
    model: ``"lstm"`` or ``"transformer"``.
    rounds: federated rounds (after FedGen's ``pretrain_epochs`` rounds of stage one, if any).
    local_epochs: minibatch steps per client per round.
    batch_size: windows per minibatch.
    learning_rate: the clients' optimizer learning rate.
    optimizer: ``"sgd"`` or ``"adam"``.
    num_users: clients drawn from the dataset's viewers (``users`` takes precedence).
    users: explicit viewer names, or ``None``.
    clients_per_round: clients that train each round; ``None`` for all.
    beta: blending of what clients receive (1 overwrites).
    split: ``"video"`` or ``"time"``.
    latent_dim: size of the encoder's output z.
    eval_every: evaluate every this many rounds (the last round always).
    times: number of repeated runs with seeds ``seed, seed + 1, ...``.
    seed: seed of the first run; also draws the users.
    devices: split the clients over this many devices (``None``: the default device only).
    fedgen: FedGen's settings (used by the FedGen family only; every algorithm accepts them).
  """

  algo: str = "fedavg"
  dataset: str = "Synthetic-m10-h1"
  data_dir: str | None = None
  model: str = "transformer"
  rounds: int = 100
  local_epochs: int = 10
  batch_size: int = 64
  learning_rate: float = 0.01
  optimizer: str = "sgd"
  num_users: int | None = 10
  users: tuple[str, ...] | None = None
  clients_per_round: int | None = None
  beta: float = 1.0
  split: str = "video"
  latent_dim: int = 32
  eval_every: int = 1
  times: int = 1
  seed: int = 0
  devices: int | None = None
  fedgen: FedGenConfig = dataclasses.field(default_factory=FedGenConfig)

  @property
  def total_rounds(self) -> int:
    """Rounds the run does: FedGen's stage-one rounds, then ``rounds``."""
    uses_generator = self.algo in ALGORITHMS and ALGORITHMS[self.algo].generator
    return self.rounds + (self.fedgen.pretrain_epochs if uses_generator else 0)

  def check(self) -> None:
    """Raises ConfigError for settings that cannot work, before any data is read."""
    parse_spec(self.dataset)
    choices = {"algo": ALGORITHMS, "model": MODELS, "optimizer": OPTIMIZERS, "split": SPLITS}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f"--{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
    for name in ("rounds", "times", "local_epochs", "batch_size", "eval_every"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} {getattr(self, name)}: must be at least 1")
    if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
      raise ConfigError(f"--learning_rate {self.learning_rate}: must be a positive number")
    if self.latent_dim < 7:
      raise ConfigError(f"--latent-dim {self.latent_dim}: must be at least 7 (6 hold the motion)")
    if self.num_users is not None and self.num_users < 1:
      raise ConfigError(f"--num_users {self.num_users}: must be at least 1")
    if self.users is not None and not self.users:
      raise ConfigError("--users: the list of viewers is empty")
    clients = len(self.users) if self.users is not None else self.num_users
    source = "--users" if self.users is not None else "--num_users"
    per_round = self.clients_per_round
    if per_round is not None and clients is not None and per_round > clients:
      raise ConfigError(
        f"--clients-per-round {per_round} exceeds the {clients} clients of {source}"
      )
    if self.devices is not None and self.devices < 1:
      raise ConfigError(f"--devices {self.devices}: must be at least 1")
    if self.seed < 0:
      raise ConfigError(f"--seed {self.seed}: must be at least 0")
    self.round_config().check()
    self.fedgen.check()

  def round_config(self) -> RoundConfig:
    """The settings of a round, with what the algorithm's server sends."""
    return RoundConfig(
      send=ALGORITHMS[self.algo].send if self.algo in ALGORITHMS else "full",
      beta=self.beta,
      local_steps=self.local_epochs,
      batch_size=self.batch_size,
      clients_per_round=self.clients_per_round,
      eval_every=self.eval_every,
    )

  def make_optimizer(self) -> optax.GradientTransformation:
    """The clients' optax optimizer at ``learning_rate``."""
    return {"sgd": optax.sgd, "adam": optax.adam}[self.optimizer](self.learning_rate)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A configuration's data, model and algorithm, ready to run.

  Attributes:
    config: the configuration.
    spec: the parsed dataset spec.
    users: the viewers who are clients, client i being ``users[i]``.
    data: their windows on device.
    algorithm: the federated algorithm.
    mesh: the ``"clients"`` device mesh ``data`` is split over, or ``None`` (one device).
  """

  config: RunConfig
  spec: DatasetSpec
  users: tuple[str, ...]
  data: ClientData
  algorithm: FederatedAlgorithm
  mesh: Mesh | None = None


def prepare(config: RunConfig) -> Experiment:
  """Loads the data and builds the model and algorithm that ``config`` describes."""
  config.check()
  spec = parse_spec(config.dataset)
  traces = load_traces(spec, config.data_dir, seed=config.seed)
  users = select_users(traces, config.num_users, config.users, seed=config.seed)
  data = build_client_data(traces, spec, users, config.split, seed=config.seed)
  if config.clients_per_round is not None and config.clients_per_round > len(users):
    raise ConfigError(
      f"--clients-per-round {config.clients_per_round} exceeds the {len(users)} clients"
    )
  model = build_model(config.model, spec.history, spec.horizon, latent_dim=config.latent_dim)
  algorithm = build_algorithm(
    config.algo, model, config.make_optimizer(), config.round_config(), config.fedgen
  )
  mesh = None
  if config.devices is not None:
    mesh = client_mesh(config.devices)
    data = shard_data(data, mesh)
  return Experiment(config, spec, users, data, algorithm, mesh)


def baseline_summaries(data: ClientData, horizon: int) -> dict[str, Summary]:
  """No-motion and constant-velocity errors on every client's test windows."""
  return {
    name: summarize(error_sums(predict(data.test_x, horizon), data.test_y, data.test_mask))
    for name, predict in BASELINES.items()
  }


def beats_baselines(
  orthodromic_deg: np.ndarray, baselines: dict[str, dict[str, Any]]
) -> dict[str, list[bool]]:
  """Per baseline, whether the model's mean great-circle error is lower at each horizon step."""
  return {
    name: [bool(m < b) for m, b in zip(orthodromic_deg, base["orthodromic_deg"], strict=True)]
    for name, base in baselines.items()
  }


def summary_dict(summary: Summary) -> dict[str, Any]:
  """A :class:`Summary` as plain JSON-ready numbers (non-finite ones as ``None``)."""
  return {
    "loss": _finite_or_none(summary.loss),
    "orthodromic_deg": [_finite_or_none(d) for d in np.asarray(summary.orthodromic_deg)],
  }


ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``(rounds_done, rounds_total, last_round_record) -> None``."""


Seeds = int | Sequence[int]
"""One seed, or several run as one vmapped program (state and metrics gain a seeds axis)."""


def seed_keys(seeds: Seeds) -> tuple[PRNGKey, PRNGKey]:
  """``(init_key, rounds_key)`` of every run: the two halves of ``split(key(seed))``; round r
  uses ``fold_in(rounds_key, r)``. With several seeds, both are ``key[seeds]``."""
  if np.ndim(seeds) == 0:
    init_key, rounds_key = jax.random.split(jax.random.key(int(seeds)))  # type: ignore[arg-type]
    return init_key, rounds_key
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
  return keys[:, 0], keys[:, 1]


def round_key(rounds_key: PRNGKey, r: int) -> PRNGKey:
  """Round ``r``'s key, for one ``rounds_key`` or a ``key[seeds]`` of them."""
  if rounds_key.ndim == 0:
    return jax.random.fold_in(rounds_key, r)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rounds_key, r)


def iterate_rounds(
  algorithm: FederatedAlgorithm,
  data: ClientData,
  seed: Seeds,
  rounds: int,
  mesh: Mesh | None = None,
  start: tuple[int, Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
  """Runs ``rounds`` rounds of ``algorithm`` with its jitted ``apply``, yielding after each.

  The keys are the ones every run uses (:func:`seed_keys`), so the same seed gives the same
  run whichever loop drives it, and seed s of a vmapped group equals seed s run alone (up to
  float rounding).

  Args:
    algorithm: any :class:`~fedvp_jax.algorithms.FederatedAlgorithm`.
    data: the clients' windows.
    seed: the PRNG seed, or a sequence of seeds to run together with
      :func:`~fedvp_jax.algorithms.over_seeds` (state and metrics then have a leading seeds
      axis).
    rounds: how many rounds.
    mesh: a ``"clients"`` mesh (see :mod:`fedvp_jax.sharding`) to split the clients' state
      over, matching ``data`` already placed on it; ``None`` for the default device.
    start: ``(round, state)`` to continue from (a restored checkpoint) instead of ``init``;
      the remaining rounds get the same keys as in an uninterrupted run.

  Yields:
    ``(state, metrics)`` after every round. A yielded state is valid until the next round
    starts: its buffers are donated to that round to save device memory.
  """
  seeds_axis = np.ndim(seed) > 0
  if seeds_axis:
    algorithm = over_seeds(algorithm)
  init_key, rounds_key = seed_keys(seed)
  first, state = start if start is not None else (0, jax.jit(algorithm.init)(init_key, data))
  if mesh is not None:
    state = shard_state(state, mesh, seeds_axis=seeds_axis)
  apply = jax.jit(algorithm.apply, donate_argnums=0)
  for r in range(first, rounds):
    state, metrics = apply(state, data, round_key(rounds_key, r))
    yield state, metrics


def run_rounds(
  algorithm: FederatedAlgorithm,
  data: ClientData,
  seed: Seeds,
  rounds: int,
  mesh: Mesh | None = None,
) -> Any:
  """The state after ``rounds`` rounds of ``algorithm`` (arguments as :func:`iterate_rounds`)."""
  if rounds < 1:
    raise ConfigError(f"rounds {rounds}: must be at least 1")
  # Drain the iterator, keeping only the last (state, metrics).
  ((state, _),) = collections.deque(iterate_rounds(algorithm, data, seed, rounds, mesh), maxlen=1)
  return state


def train(
  experiment: Experiment,
  seeds: Sequence[int],
  *,
  on_round: Callable[[int, dict[str, Any]], None] | None = None,
  progress: ProgressFn | None = None,
  start: tuple[int, Any] | None = None,
  earlier: Sequence[Sequence[dict[str, Any]]] | None = None,
  on_state: Callable[[int, Any], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
  """Runs the experiment for ``seeds``, all at once as one vmapped program.

  Args:
    experiment: what to run.
    seeds: the PRNG seeds; the same seed gives the same run.
    on_round: called with ``(seed, record)`` for every seed's metrics record of every round.
    progress: called after every round, with the seeds' mean losses.
    start: ``(round, state)`` to continue from, see :func:`iterate_rounds` (the state has the
      seeds axis).
    earlier: per seed, the records of the rounds before ``start`` (for the best round).
    on_state: called with ``(rounds_done, state)`` after every round, before the next one
      reuses the state's buffers (this is where checkpoints are written).

  Returns:
    ``(final_state, summaries)``: per seed, the final evaluation of the deployed models and
    the best evaluated round; the state has the seeds axis.

  Raises:
    DivergenceError: when every training client of some seed had a non-finite update.
  """
  seeds = tuple(seeds)
  rounds = experiment.config.total_rounds
  data, algorithm = experiment.data, experiment.algorithm
  started = t0 = time.perf_counter()
  best = [_best_round(records) for records in earlier or [[] for _ in seeds]]
  round_times = []
  state = None if start is None else start[1]
  first = 0 if start is None else start[0]
  rounds_iter = iterate_rounds(algorithm, data, seeds, rounds, experiment.mesh, start)
  for r, outcome in enumerate(rounds_iter, start=first):
    state, metrics = outcome
    metrics = jax.device_get(metrics)
    round_times.append(time.perf_counter() - t0)
    per_seed = [jax.tree.map(lambda x, k=k: x[k], metrics) for k in range(len(seeds))]
    records = [_round_record(r, m) for m in per_seed]
    for k, record in enumerate(records):
      if len(record["excluded_clients"]) == len(per_seed[k].selected):
        if on_round:
          on_round(seeds[k], record)
        raise DivergenceError(
          f"round {r}, seed {seeds[k]}: every training client's update was non-finite (NaN or "
          "inf), so there is nothing to aggregate; the learning rate is probably too high "
          f"(--learning_rate {experiment.config.learning_rate})"
        )
    for k, record in enumerate(records):
      record["seconds"] = round_times[-1]
      test_loss = record.get("test_loss")
      if test_loss is not None and test_loss < best[k]["loss"]:
        best[k] = {"loss": test_loss, "round": r}
      if on_round:
        on_round(seeds[k], record)
    if progress:
      progress(r + 1, rounds, _mean_record(records))
    if on_state:
      on_state(r + 1, state)
    t0 = time.perf_counter()
  evaluate = over_seeds(algorithm).evaluate
  finals = jax.device_get(jax.jit(evaluate)(state, data))
  wall = time.perf_counter() - started
  summaries = []
  for k, seed in enumerate(seeds):
    final = summarize(jax.tree.map(lambda x, k=k: x[k], finals))
    if float(final.loss) < best[k]["loss"]:
      best[k] = {"loss": float(final.loss), "round": rounds}
    summaries.append(
      {
        "seed": seed,
        "rounds": rounds,
        "final": summary_dict(final),
        "best_loss": _finite_or_none(best[k]["loss"]),
        "best_round": best[k]["round"],
        "first_round_seconds": round_times[0] if round_times else None,
        "median_round_seconds": float(np.median(round_times[1:])) if len(round_times) > 1 else None,
        "wall_seconds": wall,
        "seeds_together": len(seeds),
      }
    )
  return state, summaries


def _best_round(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The evaluated round with the lowest test loss among ``records``."""
  best: dict[str, Any] = {"loss": math.inf, "round": None}
  for record in records:
    if record.get("test_loss") is not None and record["test_loss"] < best["loss"]:
      best = {"loss": record["test_loss"], "round": record["round"]}
  return best


def _mean_record(records: list[dict[str, Any]]) -> dict[str, Any]:
  """The seeds' records as one, for the progress line: losses averaged, None if any is."""
  mean: dict[str, Any] = {}
  for name in ("train_loss", "test_loss"):
    values = [record[name] for record in records if record.get(name) is not None]
    mean[name] = sum(values) / len(values) if len(values) == len(records) else None
  return mean


def _round_record(r: int, metrics) -> dict[str, Any]:
  """One round's metrics as a JSON-ready record (``round`` counts from 0)."""
  record: dict[str, Any] = {
    "round": r,
    "train_loss": _finite_or_none(metrics.train_loss),
    "excluded_clients": [
      int(i) for i in np.asarray(metrics.selected)[np.asarray(metrics.excluded)]
    ],
  }
  if bool(metrics.evaluated):
    record.update({f"test_{k}": v for k, v in summary_dict(summarize(metrics.test)).items()})
  for name, value in metrics.extra.items():
    record[name] = _finite_or_none(value)
  return record


def _finite_or_none(value: Any) -> float | None:
  """JSON has no NaN: a non-finite number is written as null."""
  number = float(value)
  return number if math.isfinite(number) else None


def run(
  config: RunConfig,
  run_dir: str | Path,
  *,
  overwrite: bool = False,
  checkpoint_every: int | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs ``config`` (``config.times`` seeds) and writes everything into ``run_dir``.

  Args:
    config: the run.
    run_dir: the run directory; must not exist unless ``overwrite``.
    overwrite: replace an existing run directory (one holding a ``config.json``), but only
      once the new run's data and settings have been checked.
    checkpoint_every: save every seed's whole state every this many rounds (orbax, the two
      newest kept), so that :func:`resume` can continue the run after a crash.
    progress: show a progress line on stderr.
    log: where human-readable lines go.

  Returns:
    The run summary that is also written to ``summary.json``.

  Raises:
    ConfigError: for impossible settings, or an existing ``run_dir`` without ``overwrite``.
  """
  config.check()
  run_dir = Path(run_dir)
  if run_dir.exists() and not overwrite:
    raise ConfigError(
      f"run directory {run_dir} already exists; choose another --out/--name or pass "
      "--overwrite to replace it"
    )
  experiment = prepare(config)  # every input error surfaces before anything on disk changes
  if run_dir.exists():
    if not (run_dir / "config.json").is_file():
      raise ConfigError(
        f"{run_dir} exists but is not a run directory (it has no config.json); refusing to "
        "replace it even with --overwrite"
      )
    shutil.rmtree(run_dir)
  try:
    run_dir.mkdir(parents=True)
  except OSError as err:
    raise ConfigError(f"cannot create run directory {run_dir} (check --out): {err}") from err
  _write_json(run_dir / "config.json", _config_record(experiment, checkpoint_every))
  baselines = {
    k: summary_dict(v)
    for k, v in baseline_summaries(experiment.data, experiment.spec.horizon).items()
  }
  _write_json(run_dir / "baselines.json", baselines)
  log(
    f"{experiment.spec}: {len(experiment.users)} clients, "
    f"{int(experiment.data.train_counts.sum())} train / {int(experiment.data.test_counts.sum())} "
    f"test windows; {config.algo}, {config.model}, {config.total_rounds} rounds"
  )
  if ALGORITHMS[config.algo].generator:
    g = config.fedgen
    log(
      f"  FedGen: alpha {g.alpha}, generator lr {g.gen_learning_rate}, {g.gen_steps} generator "
      f"steps/round, {g.pretrain_epochs} stage-one rounds (FedGen's code: alpha 10, lr 1e-4)"
    )
  for name, b in baselines.items():
    log(
      f"  baseline {name:18s} loss {_fmt(b['loss'])}  orthodromic {_degrees(b['orthodromic_deg'])}"
    )

  seeds = _run_seeds(experiment, run_dir, checkpoint_every, progress, log)
  return _finish(config, run_dir, baselines, seeds, log)


def _finish(
  config: RunConfig,
  run_dir: Path,
  baselines: dict[str, Any],
  seeds: list[dict[str, Any]],
  log: Callable[[str], None],
) -> dict[str, Any]:
  """Writes the run's summary.json from its seeds' summaries and logs it."""
  losses = np.array([s["final"]["loss"] for s in seeds], dtype=float)  # None -> nan
  degrees = np.array([s["final"]["orthodromic_deg"] for s in seeds], dtype=float)
  ddof = 1 if len(seeds) > 1 else 0  # the sample std over seeds
  result: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "baselines": baselines,
    "seeds": seeds,
    "final_loss_mean": _finite_or_none(losses.mean()),
    "final_loss_std": _finite_or_none(losses.std(ddof=ddof)),
    "orthodromic_deg_mean": [_finite_or_none(d) for d in degrees.mean(axis=0)],
    "orthodromic_deg_std": [_finite_or_none(d) for d in degrees.std(axis=0, ddof=ddof)],
    "beats_baselines": beats_baselines(degrees.mean(axis=0), baselines),
  }
  _write_json(run_dir / "summary.json", result)
  log(
    f"Average Global Loss {_fmt(result['final_loss_mean'])} ± {_fmt(result['final_loss_std'])} "
    f"over {config.times} seed(s); orthodromic {_degrees(result['orthodromic_deg_mean'])}"
  )
  for name, wins in result["beats_baselines"].items():
    verdict = (
      "at every horizon"
      if all(wins)
      else f"NOT at steps {[i + 1 for i, w in enumerate(wins) if not w]}"
    )
    log(f"  beats {name}: {verdict}")
  log(f"run directory: {run_dir}")
  return result


def _run_seeds(
  experiment: Experiment,
  run_dir: Path,
  checkpoint_every: int | None,
  progress: bool,
  log: Callable[[str], None],
) -> list[dict[str, Any]]:
  """Runs (or continues, from the newest good checkpoint) every seed of a run, together."""
  config = experiment.config
  seeds = [config.seed + k for k in range(config.times)]
  seed_dirs = [run_dir / f"seed{seed}" for seed in seeds]
  if all((d / "summary.json").is_file() for d in seed_dirs):  # finished before an interruption
    return [json.loads((d / "summary.json").read_text()) for d in seed_dirs]
  if any((d / "checkpoints").is_dir() for d in seed_dirs):
    raise ConfigError(
      f"{run_dir} has checkpoints in seed<k>/checkpoints, the layout of fedvp_jax before "
      "seeds ran together; this version cannot resume it (start the run again)"
    )
  (run_dir / "diverged.json").unlink(missing_ok=True)  # this attempt decides anew
  has_checkpoints = (run_dir / "checkpoints").is_dir()
  manager = _checkpoints(run_dir) if checkpoint_every or has_checkpoints else None
  start = _restore_newest(manager, experiment, seeds, log) if has_checkpoints and manager else None
  first = start[0] if start is not None else 0
  earlier = [_records_before(d / "metrics.jsonl", first) for d in seed_dirs]
  files = []
  for seed_dir, records in zip(seed_dirs, earlier, strict=True):
    seed_dir.mkdir(exist_ok=True)
    files.append((seed_dir / "metrics.jsonl").open("w"))
    files[-1].writelines(json.dumps(record) + "\n" for record in records)
  by_seed = dict(zip(seeds, files, strict=True))

  def write(seed: int, record: dict[str, Any]) -> None:
    by_seed[seed].write(json.dumps(record) + "\n")
    by_seed[seed].flush()

  saved = [first] if start is not None else []

  def save(rounds_done: int, state: Any) -> None:
    if manager and checkpoint_every and rounds_done % checkpoint_every == 0:
      written = manager.save(rounds_done, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()  # the next round reuses the state's buffers
      if written:
        saved.append(rounds_done)

  label = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
  bar = ProgressBar(label) if progress else None
  try:
    _, summaries = train(
      experiment, seeds, on_round=write, progress=bar, start=start, earlier=earlier, on_state=save
    )
  except DivergenceError as err:
    kept = (
      f"the last good checkpoint, of round {saved[-1]}, is kept in {run_dir / 'checkpoints'}"
      if saved
      else "no checkpoint was written (see --checkpoint-every)"
    )
    message = f"{err}; {kept}"
    _write_json(run_dir / "diverged.json", {"message": message, "checkpoint": saved[-1:]})
    raise DivergenceError(message) from err
  finally:
    for file in files:
      file.close()
  for seed_dir, summary in zip(seed_dirs, summaries, strict=True):
    _write_json(seed_dir / "summary.json", summary)
    final = summary["final"]
    log(
      f"  seed {summary['seed']}: Average Global Loss {_fmt(final['loss'])}  orthodromic "
      f"{_degrees(final['orthodromic_deg'])}"
    )
  median = summaries[0]["median_round_seconds"] or 0.0
  log(f"  {median:.3f} s/round for {len(seeds)} seed(s) together")
  return summaries


def _records_before(metrics_path: Path, first: int) -> list[dict[str, Any]]:
  """The metrics records of rounds before ``first``; rounds after a checkpoint are recomputed,
  so their records (and a torn last line) are dropped."""
  if first == 0 or not metrics_path.is_file():
    return []
  records = []
  for line in metrics_path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      break
    if record["round"] < first:
      records.append(record)
  return records


def _checkpoints(run_dir: Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager((run_dir / "checkpoints").resolve(), options=options)


def _restore_newest(
  manager: ocp.CheckpointManager,
  experiment: Experiment,
  seeds: Sequence[int],
  log: Callable[[str], None],
) -> tuple[int, Any] | None:
  """The newest checkpoint that restores, as ``(round, state)``; a corrupt one is reported and
  the one before it used.

  The state is restored against an abstract tree that carries this run's shardings, so a
  checkpoint written on any number of devices lands directly on this run's devices.
  """
  if not manager.all_steps():
    return None
  init_keys, _ = seed_keys(seeds)
  shapes = jax.eval_shape(over_seeds(experiment.algorithm).init, init_keys, experiment.data)
  shardings = state_shardings(shapes, experiment.mesh, seeds_axis=True)
  abstract = jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    shapes,
    shardings,
  )
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:
      # Set aside, not deleted; orbax would not write this round again while it is there.
      aside = Path(manager.directory) / f"unreadable-{step}"
      (Path(manager.directory) / str(step)).rename(aside)
      manager.reload()
      log(
        f"  checkpoint at round {step} is unreadable ({type(err).__name__}); moved to {aside}; "
        "trying the one before"
      )
      continue
    log(f"  resuming from the checkpoint at round {step}")
    return step, state
  log("  no readable checkpoint; starting over")
  return None


def resume(
  run_dir: str | Path,
  *,
  devices: int | None = None,
  data_dir: str | None = None,
  checkpoint_every: int | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Continues an interrupted run from its checkpoints, with its own saved configuration.

  Every seed continues from the newest readable checkpoint (or starts over without one), and
  the final metrics equal an uninterrupted run's. A finished run is only summarised again.

  Args:
    run_dir: the run directory.
    devices: split the clients over this many devices instead of the saved ``devices`` (a
      checkpoint written on any number of devices restores on any other).
    data_dir: read the data from here instead of the saved ``data_dir`` (it moved).
    checkpoint_every: checkpoint at this interval instead of the saved one.
    progress: show a progress line on stderr.
    log: where human-readable lines go.

  Raises:
    ConfigError: when ``run_dir`` is not a readable run directory.
  """
  run_dir = Path(run_dir)
  try:
    record = json.loads((run_dir / "config.json").read_text())
    config = _config_from_dict(record["config"])
    baselines = json.loads((run_dir / "baselines.json").read_text())
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise ConfigError(
      f"--resume {run_dir}: not a readable run directory (config.json and baselines.json): "
      f"{type(err).__name__}: {err}"
    ) from err
  if devices is not None:
    config = dataclasses.replace(config, devices=devices)
  if data_dir is not None:
    config = dataclasses.replace(config, data_dir=data_dir)
  experiment = prepare(config)
  log(f"resuming {run_dir}: {experiment.spec}, {config.algo}, {config.total_rounds} rounds")
  every = checkpoint_every or record.get("checkpoint_every")
  seeds = _run_seeds(experiment, run_dir, every, progress, log)
  return _finish(config, run_dir, baselines, seeds, log)


def _config_from_dict(fields: dict[str, Any]) -> RunConfig:
  fields = dict(fields)
  fields["fedgen"] = FedGenConfig(**fields["fedgen"])
  if fields.get("users") is not None:
    fields["users"] = tuple(fields["users"])
  return RunConfig(**fields)


class ProgressBar:
  """A one-line progress display on stderr; on a non-terminal, a line every 10%."""

  def __init__(self, label: str, stream=None):
    self.label = label
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.first_done: float | None = None

  def __call__(self, done: int, total: int, record: dict[str, Any]) -> None:
    """Shows ``done`` of ``total`` rounds and the last round's loss (a :data:`ProgressFn`)."""
    # Rounds per second from the end of the first round on: the first one includes compiling.
    now = time.perf_counter()
    if self.first_done is None:
      self.first_done = now
    rate = (done - 1) / max(now - self.first_done, 1e-9)
    loss = record.get("test_loss")
    loss_text = (
      f"test loss {_fmt(loss)}" if loss is not None else f"train loss {_fmt(record['train_loss'])}"
    )
    width = 24
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    line = f"{self.label} [{bar}] {done}/{total} {loss_text} {rate:.1f} rounds/s"
    if self.tty:
      self.stream.write("\r" + line + ("\n" if done == total else ""))
      self.stream.flush()
    elif done == total or done % max(1, total // 10) == 0:
      self.stream.write(line + "\n")
      self.stream.flush()


def resolve_device(name: str) -> jax.Device:
  """The JAX device for ``--device``: ``cpu``, or ``cuda``/``gpu`` (CPU with a warning if none)."""
  if name in ("cuda", "gpu"):
    try:
      return jax.devices("gpu")[0]
    except RuntimeError:
      warnings.warn(f"--device {name}: no GPU is visible to JAX; running on the CPU", stacklevel=2)
      return jax.devices("cpu")[0]
  if name == "cpu":
    return jax.devices("cpu")[0]
  raise ConfigError(f"--device {name!r}: choose cpu, cuda or gpu")


def _config_record(experiment: Experiment, checkpoint_every: int | None) -> dict[str, Any]:
  import flax

  return {
    "config": dataclasses.asdict(experiment.config),
    "checkpoint_every": checkpoint_every,
    "dataset": str(experiment.spec),
    "users": list(experiment.users),
    "train_windows": [int(c) for c in np.asarray(experiment.data.train_counts)],
    "test_windows": [int(c) for c in np.asarray(experiment.data.test_counts)],
    "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    # The device a `with jax.default_device(...)` block (the script's --device) selected.
    "device": str(getattr(jax.config, "jax_default_device", None) or jax.devices()[0]),
  }


def _write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2) + "\n")


def _fmt(value: float | None, spec: str = ".5f") -> str:
  return "nan" if value is None else format(value, spec)


def _degrees(values: list[float | None]) -> str:
  if len(values) <= 6:
    return "[" + ", ".join(_fmt(v, ".2f") for v in values) + "] deg"
  steps = sorted({1, len(values) // 4, len(values) // 2, len(values)})
  return "[" + ", ".join(f"step {k}: {_fmt(values[k - 1], '.2f')}" for k in steps) + "] deg"
