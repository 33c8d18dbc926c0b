"""The runner: a configuration's rounds (:mod:`fedvp_jax.rounds`) written into its run
directory (:mod:`fedvp_jax.rundir`), with checkpoints, resume and an optional TensorBoard log.

:func:`run` and :func:`resume` run to the end and return the summary. :func:`run_steps` and
:func:`resume_steps` are the same as generators that yield a :class:`Progress` while they go
(the command line draws its progress bar from them) and return the summary. Human-readable
lines go to the ``fedvp_jax`` logger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedvp_jax import distributed
from fedvp_jax.algorithms.core import over_seeds
from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.errors import ConfigError, DivergenceError
from fedvp_jax.experiment import (
  Experiment,
  baseline_summaries,
  prepare,
  window_counts,
  with_config,
)
from fedvp_jax.privacy import Accounting
from fedvp_jax.rounds import (
  RoundOutcome,
  compile_chunks,
  group_algorithm,
  program_bytes,
  seed_keys,
  train_group,
)
from fedvp_jax.rundir import RunDir, missing_rounds, warn_log_gaps
from fedvp_jax.sharding import per_client, place, resize_clients, state_shardings
from fedvp_jax.summaries import run_summary, summary_dict

log = logging.getLogger("fedvp_jax")


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a run stands.

  Attributes:
    label: which seeds run (``"seed 0"``, ``"seeds 0-2"``).
    done: rounds done.
    total: rounds the run has.
    compiling: the next round is the first of this process, so it compiles the round first.
    train_loss: the last round's mean training loss over the seeds (``None`` if unknown).
    test_loss: its mean test loss, if it was evaluated.
  """

  label: str
  done: int
  total: int
  compiling: bool = False
  train_loss: float | None = None
  test_loss: float | None = None


RunSteps = Generator[Progress, None, dict[str, Any]]
"""Yields :class:`Progress`; returns the run's summary (``summary.json``)."""


def drain(steps: RunSteps) -> dict[str, Any]:
  """Runs ``steps`` to the end; its summary."""
  while True:
    try:
      next(steps)
    except StopIteration as stop:
      return stop.value


def run(config: RunConfig, run_dir: str | Path, **options: Any) -> dict[str, Any]:
  """Runs ``config`` (``config.num_seeds`` seeds) into ``run_dir``; options as
  :func:`run_steps`. Returns the summary also written to ``summary.json``."""
  return drain(run_steps(config, run_dir, **options))


def resume(run_dir: str | Path, **options: Any) -> dict[str, Any]:
  """Continues an interrupted run; options as :func:`resume_steps`."""
  return drain(resume_steps(run_dir, **options))


def run_steps(
  config: RunConfig,
  run_dir: str | Path,
  *,
  overwrite: bool = False,
  checkpoint_every: int | None = None,
  tensorboard: bool = False,
) -> RunSteps:
  """Runs ``config`` and writes everything into ``run_dir``, yielding progress.

  Args:
    config: the run.
    run_dir: the run directory; must not exist unless ``overwrite``.
    overwrite: replace an existing run directory (one holding a ``config.json``), but only
      once the new run's data and settings have been checked.
    checkpoint_every: save every seed's whole state every this many rounds (orbax, the two
      newest kept), so that :func:`resume` can continue the run after a crash.
    tensorboard: also write the per-round scalars as TensorBoard event files.

  Raises:
    ConfigError: for an existing ``run_dir`` without ``overwrite``.
    DataError, SettingError: for data that cannot serve ``config``.
    DivergenceError: when the run diverged (see :func:`fedvp_jax.rounds.diverged_models`):
      ``diverged.json`` then names the last checkpoint of models known good.
    OSError: when a file could not be written (a full disk); what was written stays, and
      :func:`resume` continues the run.
  """
  target = RunDir(run_dir)
  replace = _check_new(target, overwrite)
  experiment = prepare(config)  # every input error surfaces before anything on disk changes
  baselines = _baselines(experiment)
  with _created(target, experiment, replace, checkpoint_every, baselines):
    return (yield from _run_alone(experiment, target, checkpoint_every, tensorboard, baselines))


def group_steps(
  configs: Sequence[RunConfig],
  run_dirs: Sequence[str | Path],
  resume: Sequence[bool],
  *,
  overwrite: bool = False,
  checkpoint_every: int | None = None,
  tensorboard: bool = False,
  memory_limit: int | None = None,
) -> GroupSteps:
  """Runs configurations that can share a program (equal
  :func:`~fedvp_jax.config.program_key`; on one device, without DP or ``patience``) as one
  program (:func:`~fedvp_jax.rounds.train_group`), each into its own run directory exactly as
  :func:`run_steps` or :func:`resume_steps` would run it alone: its own metrics, checkpoints,
  summary and resume. One run that diverges stops; the others go on.

  Args:
    configs: the runs.
    run_dirs: their run directories.
    resume: per run, whether it continues the run its directory holds (from its checkpoints)
      rather than starting a new one there.
    overwrite: a new run may replace the run its directory holds.
    checkpoint_every, tensorboard: as :func:`run_steps`, for every run.
    memory_limit: the most bytes of memory one program may take; more runs than fit run as
      several programs (default: :func:`memory_limit_bytes`).

  Returns:
    Every run's summary, or the :class:`DivergenceError` that stopped it.

  Raises:
    ConfigError: for a run directory :func:`run_steps` or :func:`resume_steps` would refuse.
    DataError, SettingError: for data that cannot serve the runs.
  """
  if len(configs) > 1 and not all(can_share(config) for config in configs):
    raise ConfigError(
      "runs split over devices (devices), with DP or stopping early (patience) cannot share a "
      "program: run each alone"
    )
  targets = [RunDir(path) for path in run_dirs]
  replace = [
    False if again else _check_new(target, overwrite)
    for target, again in zip(targets, resume, strict=True)
  ]
  for target, again in zip(targets, resume, strict=True):
    if again and not target.exists():
      raise ConfigError(f"{target.path} is not a run directory (it has no config.json)")
  asked = checkpoint_every  # what new runs record
  if checkpoint_every is None:  # as resume_steps: continue at the interval the runs had
    resumed = [target for target, again in zip(targets, resume, strict=True) if again]
    saved = [target.read_record().get("checkpoint_every") for target in resumed]
    checkpoint_every = next((every for every in saved if every), None)
  leader = prepare(configs[0])  # the data is read once: every run reads the same
  experiments = [leader, *(with_config(leader, config) for config in configs[1:])]
  baselines = _baselines(leader)  # the same test windows for every run
  with contextlib.ExitStack() as held:
    runs = []
    for experiment, target, again, old in zip(experiments, targets, resume, replace, strict=True):
      if again:
        held.enter_context(target.lock())
        log.info(f"resuming {target.path}")
        runs.append(_Run(experiment, target, target.read_baselines()))
      else:
        held.enter_context(_created(target, experiment, old, asked, baselines))
        runs.append(_Run(experiment, target, baselines))
    return (yield from _run_group(runs, checkpoint_every, tensorboard, memory_limit))


def can_share(config: RunConfig) -> bool:
  """Whether ``config`` can run in a group (:func:`group_steps`): on one device (the clients'
  sharding knows no configurations axis), without DP (its noise follows each run's own
  number of rounds) and without ``patience`` (which stops each run on its own)."""
  return config.devices is None and config.patience is None and not config.privacy.enabled


def _check_new(target: RunDir, overwrite: bool) -> bool:
  """Refuses a run directory that exists, unless ``overwrite`` and it holds a run; whether
  there is one to replace."""
  # Every process of a job looks at the folder before prepare()'s collectives, so before
  # process 0 replaces or creates it.
  if target.path.exists() and not overwrite:
    raise ConfigError(
      f"run directory {target.path} already exists; choose another name or output folder, "
      "or overwrite it"
    )
  if target.path.exists() and not target.exists():
    raise ConfigError(
      f"{target.path} exists but is not a run directory (it has no config.json); refusing "
      "to replace it"
    )
  return target.path.exists()


def _baselines(experiment: Experiment) -> dict[str, Any]:
  """The trivial predictors' summaries on ``experiment``'s test windows."""
  summaries = baseline_summaries(experiment.data.test, experiment.spec.horizon)
  return {name: summary_dict(summary) for name, summary in summaries.items()}


@contextlib.contextmanager
def _created(
  target: RunDir,
  experiment: Experiment,
  replace: bool,
  checkpoint_every: int | None,
  baselines: dict[str, Any],
) -> Iterator[None]:
  """Makes ``target`` the new run directory of ``experiment`` (first removing the run it
  holds, with ``replace``, as :func:`_check_new` allowed), writing ``baselines`` there, and
  holds its lock while open. A run that fails before its directory is a run directory leaves
  no folder behind."""
  if replace:
    with target.lock():  # never replace a run that another process is writing
      pass
    if target.writer:
      shutil.rmtree(target.path)
  try:
    if target.writer:
      target.path.mkdir(parents=True)
  except OSError as err:
    raise ConfigError(f"cannot create run directory {target.path}: {err}") from err
  try:
    with target.lock():
      target.write_baselines(baselines)
      target.write_config(_config_record(experiment, checkpoint_every))  # now a run directory
      _describe(experiment, baselines)
      yield
  except BaseException:
    # Failed (a full disk, Ctrl-C) before it was a run directory: leave no folder that
    # neither --resume nor --overwrite would take.
    if target.writer and not target.exists():
      shutil.rmtree(target.path, ignore_errors=True)
    raise


def resume_steps(
  run_dir: str | Path,
  *,
  devices: int | None = None,
  data_dir: str | None = None,
  checkpoint_every: int | None = None,
  tensorboard: bool = False,
) -> RunSteps:
  """Continues an interrupted run from its checkpoints, with its own saved settings.

  Every seed continues from the newest readable checkpoint (or starts over without one), and
  the final metrics equal an uninterrupted run's. A finished run is only summarised again.

  Args:
    run_dir: the run directory.
    devices: split the clients over this many devices instead of the saved number (a
      checkpoint written on any number of devices restores on any other).
    data_dir: read the data from here instead of the saved data root (it moved).
    checkpoint_every: checkpoint at this interval instead of the saved one.
    tensorboard: also write the per-round scalars as TensorBoard event files.

  Raises:
    ConfigError: when ``run_dir`` is not a readable run directory.
    DivergenceError, OSError: as :func:`run_steps`.
  """
  target = RunDir(run_dir)
  if not target.exists():
    raise ConfigError(f"{target.path} is not a run directory (it has no config.json)")
  with target.lock():
    return (yield from _resume(target, devices, data_dir, checkpoint_every, tensorboard))


def _resume(
  target: RunDir,
  devices: int | None,
  data_dir: str | None,
  checkpoint_every: int | None,
  tensorboard: bool,
) -> RunSteps:
  config = target.read_config()
  record = target.read_record()
  baselines = target.read_baselines()
  if devices is not None:
    config = dataclasses.replace(config, devices=devices)
  if data_dir is not None:
    config = dataclasses.replace(config, data_dir=data_dir)
  experiment = prepare(config)
  log.info(
    f"resuming {target.path}: {experiment.spec}, {config.algorithm}, {config.total_rounds} rounds"
  )
  every = checkpoint_every or record.get("checkpoint_every")
  return (yield from _run_alone(experiment, target, every, tensorboard, baselines))


def _describe(experiment: Experiment, baselines: dict[str, Any]) -> None:
  config = experiment.config
  counts = window_counts(experiment.data)
  log.info(
    f"{experiment.spec}: {len(experiment.users)} clients, {counts['train'].sum()} "
    f"train / {counts['validation'].sum()} validation / {counts['test'].sum()} test "
    f"windows; {len(experiment.new_users)} new viewers; {config.algorithm}, {config.model}, "
    f"{config.total_rounds} rounds"
  )
  if config.uses_generator:
    g = config.fedgen
    log.info(
      f"  FedGen: alpha {g.alpha}, generator lr {g.gen_learning_rate}, {g.gen_steps} generator "
      f"steps/round, {g.pretrain_rounds} stage-one rounds (FedGen's code: alpha 10, lr 1e-4)"
    )
  for name, b in baselines.items():
    log.info(
      f"  baseline {name:18s} loss {_fmt(b['loss'])}  orthodromic {_degrees(b['orthodromic_deg'])}"
    )


def _run_alone(
  experiment: Experiment,
  target: RunDir,
  checkpoint_every: int | None,
  tensorboard: bool,
  baselines: dict[str, Any],
) -> RunSteps:
  """Runs (or continues, from the newest good checkpoint) every seed of a run, together, and
  writes the run's summary.

  Raises:
    DivergenceError: when it diverged.
  """
  run = _Run(experiment, target, baselines)
  (result,) = yield from _without_index(_run_group([run], checkpoint_every, tensorboard))
  if isinstance(result, DivergenceError):
    raise result
  return result


def _without_index(steps: GroupSteps) -> Generator[Progress, None, list[RunResult]]:
  """``steps``' progress events without the run's index (for a group of one)."""
  with contextlib.closing(steps):  # a close() of this generator reaches the runs' files
    while True:
      try:
        _, progress = next(steps)
      except StopIteration as stop:
        return stop.value
      yield progress


RunResult = dict[str, Any] | DivergenceError
"""A run's summary (``summary.json``), or why it diverged."""

GroupSteps = Generator[tuple[int, Progress], None, list[RunResult]]
"""Yields ``(which run, Progress)``; returns every run's :data:`RunResult`, in order."""


@dataclasses.dataclass
class _Run:
  """A run of a group while it runs.

  Attributes:
    experiment: what it runs.
    target: its run directory, which this process has locked.
    baselines: the trivial predictors' summaries written there.
    manager: its checkpoints' orbax manager, or ``None`` when it writes none.
    start: ``(round, state)`` it continues from, or ``None`` to start over.
    earlier: per seed, its records of the rounds before ``start``.
    files: per seed, its metrics log, open for appending.
    board: its TensorBoard log, or ``None``.
  """

  experiment: Experiment
  target: RunDir
  baselines: dict[str, Any]
  manager: Any = None
  start: tuple[int, Any] | None = None
  earlier: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
  files: list[Any] = dataclasses.field(default_factory=list)
  board: Any = None

  @property
  def seeds(self) -> list[int]:
    config = self.experiment.config
    return [config.seed + k for k in range(config.num_seeds)]

  @property
  def first(self) -> int:
    return 0 if self.start is None else self.start[0]

  @property
  def label(self) -> str:
    seeds = self.seeds
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def _run_group(
  runs: Sequence[_Run],
  checkpoint_every: int | None,
  tensorboard: bool,
  memory_limit: int | None = None,
) -> GroupSteps:
  """Runs (or continues) runs that can share a program, together: those that continue from
  the same round, as many at once as fit in ``memory_limit`` bytes (:func:`_programs`); a
  group of one is a run alone. Finished runs are only summarised again."""
  # Every process of a job decides from the same files: the ones process 0 has written.
  distributed.barrier(f"read {runs[0].target.path}")
  results: dict[int, RunResult] = {}
  starts: dict[int, list[int]] = {}
  try:
    for i, run in enumerate(runs):
      finished = [run.target.read_seed_summary(seed) for seed in run.seeds]
      if all(s is not None for s in finished):  # finished before an interruption
        logs = [run.target.read_metrics(seed) for seed in run.seeds]
        warn_log_gaps(run.target, finished, logs)  # type: ignore[arg-type]
        results[i] = _finish(run.target, run.baselines, finished)  # type: ignore[arg-type]
        continue
      _open(run, checkpoint_every, tensorboard)
      starts.setdefault(run.first, []).append(i)
    for together in starts.values():
      for i in together:
        total = runs[i].experiment.config.total_rounds
        yield i, Progress(runs[i].label, runs[i].first, total, compiling=True)
      for members, program, seconds in _programs(runs, together, memory_limit):
        results.update((yield from _train(runs, members, checkpoint_every, program, seconds)))
  finally:
    for run in runs:
      for file in run.files:
        file.close()
      if run.board is not None:
        run.board.close()
  return [results[i] for i in range(len(runs))]


def _open(run: _Run, checkpoint_every: int | None, tensorboard: bool) -> None:
  """Finds where ``run`` continues from (its newest good checkpoint, with its metrics log
  complete before it) and opens its logs."""
  target, seeds = run.target, run.seeds
  target.clear_diverged()  # this attempt decides anew
  has_checkpoints = target.has_checkpoints()
  run.manager = target.checkpoints() if checkpoint_every or has_checkpoints else None
  if has_checkpoints:
    run.start = _restore_newest(target, run.manager, run.experiment, seeds)
  run.earlier = [target.read_metrics(seed, before=run.first) for seed in seeds]
  missing = {s: missing_rounds(r, run.first) for s, r in zip(seeds, run.earlier, strict=True)}
  if any(missing.values()):
    # The best round and the report come from these records: never summarise a partial log.
    gaps = "; ".join(f"seed {s}: rounds {m[:6]}" for s, m in missing.items() if m)
    log.info(f"  the metrics log lacks records before the checkpoint ({gaps}); starting over")
    run.start, run.earlier = None, [[] for _ in seeds]
  run.files = [
    target.open_metrics(seed, records) for seed, records in zip(seeds, run.earlier, strict=True)
  ]
  run.board = _tensorboard(target) if tensorboard else None


def _programs(
  runs: Sequence[_Run], members: list[int], memory_limit: int | None
) -> Iterator[tuple[list[int], Any, float]]:
  """``members`` (runs continuing from the same round) in groups that each fit in
  ``memory_limit`` bytes (default :func:`memory_limit_bytes`), each with its compiled chunk
  program and the seconds its compile took (``None`` and 0 for a run alone, or runs with no
  round left, which need none): a group too large is halved until it fits, as XLA's memory
  analysis of its program says."""
  done = all(runs[i].first >= runs[i].experiment.config.total_rounds for i in members)
  if len(members) == 1 or done:
    yield members, None, 0.0
    return
  experiments = [runs[i].experiment for i in members]
  started = time.perf_counter()
  seeds = runs[members[0]].seeds
  program = compile_chunks(group_algorithm(experiments), experiments[0].data, seeds)
  seconds = time.perf_counter() - started
  needed = program_bytes(program)
  limit = memory_limit or memory_limit_bytes()
  if needed <= limit:
    log.info(
      f"{len(members)} runs as one program ({needed / 2**30:.2f} GiB of the "
      f"{limit / 2**30:.1f} GiB allowed): {', '.join(runs[i].target.name for i in members)}"
    )
    yield members, program, seconds
    return
  half = len(members) // 2
  log.info(
    f"{len(members)} runs as one program would need {needed / 2**30:.2f} GiB, more than the "
    f"{limit / 2**30:.1f} GiB allowed: split into groups of {half} and {len(members) - half}"
  )
  yield from _programs(runs, members[:half], memory_limit)
  yield from _programs(runs, members[half:], memory_limit)


MEMORY_SHARE = 0.8
"""The share of the device's memory (the host's, on the CPU) a group's program may take."""


def memory_limit_bytes() -> int:
  """How much memory a group of runs may take (:data:`MEMORY_SHARE` of the default device's,
  or of the host's physical memory where the device does not say: on the CPU)."""
  device = getattr(jax.config, "jax_default_device", None) or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(MEMORY_SHARE * stats["bytes_limit"])
  return int(MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _train(
  runs: Sequence[_Run],
  members: list[int],
  checkpoint_every: int | None,
  program: Any,
  compile_seconds: float,
) -> Generator[tuple[int, Progress], None, dict[int, RunResult]]:
  """Trains ``members`` as one program (:func:`~fedvp_jax.rounds.train_group`), writing each
  run's records, checkpoints and summary as it goes; their results by index."""
  group = [runs[i] for i in members]
  first = group[0].first
  states = None if first == 0 else [run.start[1] for run in group]  # type: ignore[index]
  for run in group:  # the group stacks the states: keep no second copy on the device
    run.start = None if first == 0 else (first, None)
  every = checkpoint_every if any(run.manager for run in group) else None
  outcomes = train_group(
    [run.experiment for run in group],
    group[0].seeds,
    None if states is None else (first, states),
    [run.earlier for run in group],
    every,
    program,
    compile_seconds,
  )
  del states
  results: dict[int, RunResult] = {}
  while True:
    try:
      with distributed.peers_checked():
        outcome = next(outcomes)
    except StopIteration:
      return results
    i, run = members[outcome.run], group[outcome.run]
    _write_records(run.files, run.board, outcome.records)
    if outcome.diverged:
      results[i] = _diverged(run.target, run.manager, outcome, checkpoint_every)
      continue
    if outcome.summaries is not None:
      results[i] = _summarised(run, outcome.summaries)
      continue
    done = outcome.round + 1
    if run.manager and every and done % every == 0:
      with distributed.peers_checked():
        run.target.save_checkpoint(run.manager, done, outcome.state)
    total = run.experiment.config.total_rounds
    yield i, Progress(run.label, done, total, False, *_mean_losses(outcome.records))


def _summarised(run: _Run, summaries: list[dict[str, Any]]) -> dict[str, Any]:
  """Writes a run's seed summaries and its ``summary.json``; the latter."""
  for summary in summaries:
    run.target.write_seed_summary(summary)
    final = summary["final"]
    log.info(
      f"  seed {summary['seed']}: Average Global Loss {_fmt(final['loss'])}  orthodromic "
      f"{_degrees(final['orthodromic_deg'])}"
    )
  median = summaries[0]["median_round_seconds"] or 0.0
  log.info(f"  {median:.3f} s/round for {len(summaries)} seed(s) together")
  return _finish(run.target, run.baselines, summaries)


def _write_records(files: list[Any], board: Any, records: list[dict[str, Any]]) -> None:
  """Appends a round's records (none when only the final models were judged) to the seeds'
  metrics logs, flushed, and to the TensorBoard log if there is one."""
  if not records:
    return
  for file, record in zip(files, records, strict=True):
    file.write(_json_line(record))
    file.flush()
  if board is not None:
    board.add_round(records)


def _diverged(
  target: RunDir, manager: Any, outcome: RoundOutcome, checkpoint_every: int | None
) -> DivergenceError:
  """Records in the run directory that the run diverged, naming the newest checkpoint of models
  known good (checkpoints after ``outcome.good_until`` may hold diverged ones)."""
  saved = sorted(manager.all_steps()) if manager else []
  good = [step for step in saved if step <= outcome.good_until]
  if good:
    kept = f"the last good checkpoint, of round {good[-1]}, is kept in {target.path}/checkpoints"
  elif saved:
    known = "" if outcome.good_until < 0 else f" (round {outcome.good_until} or earlier)"
    kept = (
      f"no checkpoint of models known good{known} is kept; the ones in "
      f"{target.path}/checkpoints may hold diverged models"
    )
  elif checkpoint_every:
    kept = "no checkpoint had been written yet"
  else:
    kept = "no checkpoint was written (checkpoints were off)"
  message = f"{outcome.diverged}; {kept}"
  target.mark_diverged(message, good[-1:])
  return DivergenceError(message)


def _restore_newest(
  target: RunDir, manager: Any, experiment: Experiment, seeds: Sequence[int]
) -> tuple[int, Any] | None:
  """The newest readable checkpoint as ``(round, state)``, restored straight onto this run's
  devices: against an abstract tree carrying this run's shardings, so a checkpoint written on
  any number of devices restores on any other."""
  if not manager.all_steps():
    return None
  init_keys, _ = seed_keys(seeds)
  shapes = jax.eval_shape(over_seeds(experiment.algorithm).init, init_keys, experiment.data)
  shardings = state_shardings(shapes, experiment.mesh, seeds_axis=True)
  rows, saved = experiment.data.num_rows, target.checkpoint_rows(manager)
  if saved is None or saved == rows:
    restored = target.restore_newest(manager, _abstract(shapes, shardings))
  else:
    # Written on devices that padded the clients to another number of rows: read onto this
    # process's own device, cut or pad the rows, then place as this run places its state.
    written = jax.tree.map(
      lambda leaf, clients: jax.ShapeDtypeStruct(
        (leaf.shape[0], saved, *leaf.shape[2:]) if clients else leaf.shape, leaf.dtype
      ),
      shapes,
      per_client(shapes),
    )
    restored = target.restore_newest(
      manager, _abstract(written, state_shardings(written, None, seeds_axis=True))
    )
    if restored is not None:
      state = resize_clients(jax.device_get(restored[1]), rows, seeds_axis=True)
      restored = (restored[0], place(state, shardings), restored[2])
  for note in restored[2] if restored else []:
    log.info(f"  {note}; trying the one before")
  if restored is None:
    log.info("  no readable checkpoint; starting over")
    return None
  log.info(f"  resuming from the checkpoint at round {restored[0]}")
  return restored[0], restored[1]


def _abstract(shapes: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: what orbax restores onto."""
  return jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    shapes,
    shardings,
  )


def _finish(
  target: RunDir, baselines: dict[str, Any], seeds: list[dict[str, Any]]
) -> dict[str, Any]:
  """Writes the run's summary.json from its seeds' summaries and logs it."""
  record = target.read_record()
  result = run_summary(record["config"], baselines, seeds)
  if record.get("privacy") is not None:
    result["privacy"] = record["privacy"]
  target.write_summary(result)
  spread = "" if result["final_loss_std"] is None else f" ± {_fmt(result['final_loss_std'])}"
  log.info(
    f"Average Global Loss {_fmt(result['final_loss_mean'])}{spread} over {len(seeds)} seed(s); "
    f"orthodromic {_degrees(result['orthodromic_deg_mean'])}"
  )
  rounds = sorted(set(result["selected_rounds"]))
  log.info(
    f"selected on validation (round {'/'.join(map(str, rounds))}): Average Global Loss "
    f"{_fmt(result['selected_loss_mean'])}; orthodromic "
    f"{_degrees(result['selected_orthodromic_deg_mean'])}"
  )
  log.info(f"  gain over the best trivial predictor: {_percents(result['gain_percent'])}")
  _log_verdict("the selected model", result["beats_baselines"]["best"])
  new = result.get("new_viewers")
  if new is not None:
    log.info(
      f"new viewers ({new['viewers']}, never trained): orthodromic "
      f"{_degrees(new['selected_orthodromic_deg_mean'])}; gain {_percents(new['gain_percent'])}"
    )
    _log_verdict("on new viewers, the selected server model", new["beats_baselines"]["best"])
  if "privacy" in result:
    log.info(f"  {Accounting.from_record(result['privacy']).describe()}")
  log.info(f"run directory: {target.path}")
  return result


def _log_verdict(who: str, wins: list[bool]) -> None:
  missed = [i + 1 for i, w in enumerate(wins) if not w]
  verdict = "at every horizon" if not missed else f"NOT at steps {missed}"
  log.info(f"  {who} beats the best trivial predictor: {verdict}")


def _percents(values: list[float | None]) -> str:
  shown = values if len(values) <= 6 else [values[k - 1] for k in _steps_shown(len(values))]
  return "[" + ", ".join("nan" if v is None else f"{v:+.1f}" for v in shown) + "] %"


def _steps_shown(steps: int) -> list[int]:
  return sorted({1, steps // 4, steps // 2, steps})


def _tensorboard(target: RunDir) -> Any:
  from fedvp_jax.tensorboard import TensorBoardLog

  return TensorBoardLog(target)


def _mean_losses(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
  """The seeds' mean train and test loss, ``None`` where any seed lacks one."""
  means = []
  for name in ("train_loss", "test_loss"):
    values = [record.get(name) for record in records]
    known = [v for v in values if v is not None]
    means.append(float(np.mean(known)) if len(known) == len(values) else None)
  return means[0], means[1]


def _config_record(experiment: Experiment, checkpoint_every: int | None) -> dict[str, Any]:
  import flax
  import optax

  return {
    "config": to_record(experiment.config),
    "checkpoint_every": checkpoint_every,
    "dataset": str(experiment.spec),
    "users": list(experiment.users),
    **{
      f"{part}_windows": [int(c) for c in counts]
      for part, counts in window_counts(experiment.data).items()
    },
    "new_viewers": list(experiment.new_users),
    "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    # The device a `with jax.default_device(...)` block (the command line's --device) selected.
    "device": str(getattr(jax.config, "jax_default_device", None) or jax.devices()[0]),
    # Only DP runs carry it, so other runs' directories are as before.
    **({"privacy": experiment.privacy.record()} if experiment.privacy else {}),
  }


def _json_line(record: dict[str, Any]) -> str:
  return json.dumps(record) + "\n"


def _fmt(value: float | None, spec: str = ".5f") -> str:
  return "nan" if value is None else format(value, spec)


def _degrees(values: list[float | None]) -> str:
  if len(values) <= 6:
    return "[" + ", ".join(_fmt(v, ".2f") for v in values) + "] deg"
  steps = _steps_shown(len(values))
  return "[" + ", ".join(f"step {k}: {_fmt(values[k - 1], '.2f')}" for k in steps) + "] deg"


__all__ = [
  "MEMORY_SHARE",
  "GroupSteps",
  "Progress",
  "RunResult",
  "RunSteps",
  "can_share",
  "drain",
  "group_steps",
  "memory_limit_bytes",
  "resume",
  "resume_steps",
  "run",
  "run_steps",
]
