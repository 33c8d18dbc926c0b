"""The runner: a configuration's rounds (:mod:`fedvp_jax.rounds`) written into its run
directory (:mod:`fedvp_jax.rundir`), with checkpoints, resume and an optional TensorBoard log.

:func:`run` and :func:`resume` run to the end and return the summary. :func:`run_steps` and
:func:`resume_steps` are the same as generators that yield a :class:`Progress` while they go
(the command line draws its progress bar from them) and return the summary. Human-readable
lines go to the ``fedvp_jax`` logger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedvp_jax import distributed
from fedvp_jax.algorithms.core import over_seeds
from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.errors import ConfigError, DivergenceError
from fedvp_jax.experiment import Experiment, baseline_summaries, prepare, window_counts
from fedvp_jax.privacy import Accounting
from fedvp_jax.rounds import RoundOutcome, seed_keys, train
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
  # Every process of a job looks at the folder before prepare()'s collectives, so before
  # process 0 replaces or creates it.
  existed, was_run = target.path.exists(), target.exists()
  if existed and not overwrite:
    raise ConfigError(
      f"run directory {target.path} already exists; choose another name or output folder, "
      "or overwrite it"
    )
  if existed and not was_run:
    raise ConfigError(
      f"{target.path} exists but is not a run directory (it has no config.json); refusing "
      "to replace it"
    )
  experiment = prepare(config)  # every input error surfaces before anything on disk changes
  if existed:
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
      baselines = {
        k: summary_dict(v)
        for k, v in baseline_summaries(experiment.data.test, experiment.spec.horizon).items()
      }
      target.write_baselines(baselines)
      target.write_config(_config_record(experiment, checkpoint_every))  # now a run directory
      _describe(experiment, baselines)
      return (yield from _run_seeds(experiment, target, checkpoint_every, tensorboard, baselines))
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
  return (yield from _run_seeds(experiment, target, every, tensorboard, baselines))


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


def _run_seeds(
  experiment: Experiment,
  target: RunDir,
  checkpoint_every: int | None,
  tensorboard: bool,
  baselines: dict[str, Any],
) -> RunSteps:
  """Runs (or continues, from the newest good checkpoint) every seed of a run, together, and
  writes the run's summary."""
  config = experiment.config
  seeds = [config.seed + k for k in range(config.num_seeds)]
  # Every process of a job decides from the same files: the ones process 0 has written.
  distributed.barrier(f"read {target.path}")
  finished = [target.read_seed_summary(seed) for seed in seeds]
  if all(s is not None for s in finished):  # finished before an interruption
    logs = [target.read_metrics(seed) for seed in seeds]
    warn_log_gaps(target, finished, logs)  # type: ignore[arg-type]
    return _finish(target, baselines, finished)  # type: ignore[arg-type]
  target.clear_diverged()  # this attempt decides anew
  has_checkpoints = target.has_checkpoints()
  manager = target.checkpoints() if checkpoint_every or has_checkpoints else None
  start = _restore_newest(target, manager, experiment, seeds) if has_checkpoints else None
  first = start[0] if start is not None else 0
  earlier = [target.read_metrics(seed, before=first) for seed in seeds]
  missing = {s: missing_rounds(r, first) for s, r in zip(seeds, earlier, strict=True)}
  if any(missing.values()):
    # The best round and the report come from these records: never summarise a partial log.
    gaps = "; ".join(f"seed {s}: rounds {m[:6]}" for s, m in missing.items() if m)
    log.info(f"  the metrics log lacks records before the checkpoint ({gaps}); starting over")
    start, first, earlier = None, 0, [[] for _ in seeds]
  files = [target.open_metrics(seed, records) for seed, records in zip(seeds, earlier, strict=True)]
  board = _tensorboard(target) if tensorboard else None
  label = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
  total = config.total_rounds
  try:
    yield Progress(label, first, total, compiling=True)
    rounds = train(experiment, seeds, start, earlier, checkpoint_every if manager else None)
    while True:
      try:
        with distributed.peers_checked():
          outcome = next(rounds)
      except StopIteration as stop:
        summaries = stop.value
        break
      _write_records(files, board, outcome.records)
      if outcome.diverged:
        raise _diverged(target, manager, outcome, checkpoint_every)
      done = outcome.round + 1
      due = manager and checkpoint_every and done % checkpoint_every == 0
      if due:
        with distributed.peers_checked():
          target.save_checkpoint(manager, done, outcome.state)
      yield Progress(label, done, total, False, *_mean_losses(outcome.records))
  finally:
    for file in files:
      file.close()
    if board is not None:
      board.close()
  for summary in summaries:
    target.write_seed_summary(summary)
    final = summary["final"]
    log.info(
      f"  seed {summary['seed']}: Average Global Loss {_fmt(final['loss'])}  orthodromic "
      f"{_degrees(final['orthodromic_deg'])}"
    )
  median = summaries[0]["median_round_seconds"] or 0.0
  log.info(f"  {median:.3f} s/round for {len(seeds)} seed(s) together")
  return _finish(target, baselines, summaries)


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
  "Progress",
  "RunSteps",
  "drain",
  "resume",
  "resume_steps",
  "run",
  "run_steps",
]
