"""The run directory: the one owner of its layout. Everything that writes or reads a run's
files (the runner, sweeps, reports) goes through :class:`RunDir`.

A run directory holds::

    config.json           the resolved settings (``"config"``, see fedvp_jax.config.to_record),
                          the clients, their window counts, library versions, the device
    baselines.json        the trivial predictors' errors on the same test windows
    seed<k>/metrics.jsonl one JSON line per round, for every seed k; round r's test_* are of
                          the models deployed at the start of round r (after r aggregations),
                          as in FedGen's code; non-finite numbers are null
    seed<k>/summary.json  final and best Average Global Loss, orthodromic error, timings
    .lock, .lock.owner    held by the one process writing the run (see RunDir.lock)
    checkpoints/          with checkpoint_every: orbax checkpoints of every seed's whole state
    tensorboard/          with tensorboard: the per-round scalars as TensorBoard event files
    diverged.json         only when the run stopped because it diverged: what happened
    summary.json          the seeds' final metrics, mean and std (written last: a run
                          directory with it is finished)

In a run of several processes (:mod:`fedvp_jax.distributed`) only process 0 writes these files
(:attr:`RunDir.writer`); every process writes its part of a checkpoint through orbax.

JSON files are written whole or not at all (to a temporary file, then renamed), so a crash
never leaves a half-written one; a metrics log may end in a torn line, which readers skip.
``docs/guarantees.md`` lists everything a run directory promises.
Runs written by fedvp_jax 0.1 (settings named ``algo``, ``times``, ``local_epochs``, ...) are
read as well.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedvp_jax.config import RunConfig, from_record
from fedvp_jax.errors import ConfigError

log = logging.getLogger("fedvp_jax")

CONFIG = "config.json"
BASELINES = "baselines.json"
SUMMARY = "summary.json"
DIVERGED = "diverged.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
KEEP_CHECKPOINTS = 2


def write_json(path: Path, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically: a reader sees the old file or the new, whole."""
  write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a temporary file, then renamed); on failure (a
  full disk) the old file stays as it was and the temporary one is removed."""
  temporary = path.with_name(f".{path.name}.tmp")
  try:
    temporary.write_text(text)
    os.replace(temporary, path)
  except OSError:
    temporary.unlink(missing_ok=True)
    raise


def read_json(path: Path) -> Any:
  """The JSON in ``path``.

  Raises:
    ConfigError: naming the file, when it is missing or not whole JSON.
  """
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise ConfigError(f"{path} is missing") from None
  except (OSError, ValueError) as err:
    raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err})") from None


def is_process_zero() -> bool:
  """Whether this process writes run directories: the only process, or process 0 of a
  multi-process job (JAX, if not imported yet, has joined no job)."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


class RunDir:
  """One run directory (see the module docstring for its layout).

  Attributes:
    path: the folder.
    writer: whether this process writes it (:func:`is_process_zero`); for the other processes
      of a job every write below does nothing, and reads read what process 0 wrote.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.writer = is_process_zero()

  def __repr__(self) -> str:
    return f"RunDir({str(self.path)!r})"

  @property
  def name(self) -> str:
    return self.path.name

  def exists(self) -> bool:
    """Whether this is a run directory (it holds a ``config.json``)."""
    return (self.path / CONFIG).is_file()

  def is_finished(self) -> bool:
    return (self.path / SUMMARY).is_file()

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds the run directory for this process: two processes never write one run. The
    lock (filelock's, an OS lock) goes with the process, so a killed run leaves none behind.

    Raises:
      ConfigError: naming the process that holds it.
    """
    from filelock import FileLock, Timeout

    if not self.writer:  # process 0 holds it for the job
      yield
      return
    guard = FileLock(self.path / LOCK, timeout=0)
    owner = self.path / f"{LOCK}.owner"
    try:
      guard.acquire()
    except Timeout:
      holder = owner.read_text().strip() if owner.is_file() else "another process"
      raise ConfigError(
        f"{self.path} is being written by {holder}; wait for that run to finish or stop it"
      ) from None
    try:
      owner.write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
      yield
    finally:
      guard.release()

  # --- settings and baselines ---

  def write_config(self, record: dict[str, Any]) -> None:
    if self.writer:
      write_json(self.path / CONFIG, record)

  def read_record(self) -> dict[str, Any]:
    """The whole ``config.json``."""
    record = read_json(self.path / CONFIG)
    if not isinstance(record, dict) or "config" not in record:
      raise ConfigError(f'{self.path / CONFIG} has no "config": not a run\'s settings')
    return record

  def read_config(self) -> RunConfig:
    """The run's settings.

    Raises:
      ConfigError: naming the file, when they are unreadable or invalid.
    """
    record = self.read_record()  # its errors name the file already
    try:
      return from_record(record["config"])
    except ConfigError as err:
      raise ConfigError(f"{self.path / CONFIG}: {err}") from None

  def write_baselines(self, baselines: dict[str, Any]) -> None:
    if self.writer:
      write_json(self.path / BASELINES, baselines)

  def read_baselines(self) -> dict[str, Any]:
    return read_json(self.path / BASELINES)

  # --- per seed ---

  def seed_dir(self, seed: int) -> Path:
    return self.path / f"seed{seed}"

  def metrics_path(self, seed: int) -> Path:
    return self.seed_dir(seed) / METRICS

  def read_metrics(self, seed: int, before: int | None = None) -> list[dict[str, Any]]:
    """Seed ``seed``'s round records (of rounds before ``before``, if given). A torn last line,
    left by a run killed while writing it, ends the log."""
    path = self.metrics_path(seed)
    if not path.is_file():
      return []
    records = []
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        break
      if before is None or record["round"] < before:
        records.append(record)
    return records

  def open_metrics(self, seed: int, records: list[dict[str, Any]]):
    """Seed ``seed``'s metrics log, started afresh with ``records``, open for appending. The
    restart is atomic: until it is written whole, the old log stays."""
    if not self.writer:
      return open(os.devnull, "a")
    self.seed_dir(seed).mkdir(exist_ok=True)
    path = self.metrics_path(seed)
    write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    return path.open("a")

  def write_seed_summary(self, summary: dict[str, Any]) -> None:
    if self.writer:
      write_json(self.seed_dir(summary["seed"]) / SUMMARY, summary)

  def read_seed_summary(self, seed: int) -> dict[str, Any] | None:
    path = self.seed_dir(seed) / SUMMARY
    return read_json(path) if path.is_file() else None

  # --- the run's outcome ---

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.writer:
      write_json(self.path / SUMMARY, summary)

  def read_summary(self) -> dict[str, Any] | None:
    """``summary.json``, or ``None`` when the run has not finished."""
    path = self.path / SUMMARY
    return read_json(path) if path.is_file() else None

  def mark_diverged(self, message: str, checkpoint: list[int]) -> None:
    if self.writer:
      write_json(self.path / DIVERGED, {"message": message, "checkpoint": checkpoint})

  def clear_diverged(self) -> None:
    if self.writer:
      (self.path / DIVERGED).unlink(missing_ok=True)

  def diverged(self) -> str | None:
    """What made the run stop, if it diverged."""
    path = self.path / DIVERGED
    return read_json(path)["message"] if path.is_file() else None

  # --- checkpoints ---

  def has_checkpoints(self) -> bool:
    return (self.path / CHECKPOINTS).is_dir()

  def checkpoints(self):
    """The orbax manager of ``checkpoints/`` (the newest :data:`KEEP_CHECKPOINTS` kept)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP_CHECKPOINTS, create=True)
    return ocp.CheckpointManager((self.path / CHECKPOINTS).resolve(), options=options)

  def save_checkpoint(self, manager, step: int, state: Any) -> None:
    """Saves ``state`` as round ``step``'s checkpoint.

    Raises:
      OSError: when the checkpoint could not be written (a full disk, a read-only folder); the
        half-written one is removed and the earlier checkpoints stay, so the run resumes.
    """
    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level, unraisable = absl.level, sys.unraisablehook
    absl.setLevel(logging.CRITICAL)  # orbax logs every failed write thread at length,
    sys.unraisablehook = _quiet_unraisable  # and its I/O callbacks fail once it gives up
    try:
      manager.save(step, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()  # the next round reuses the state's buffers
    except (OSError, ValueError) as err:
      # tensorstore reports a failed write as a ValueError carrying an absl status code.
      if isinstance(err, ValueError) and not str(err).startswith(_WRITE_FAILURES):
        raise
      for partial in Path(manager.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
        if self.writer:
          shutil.rmtree(partial, ignore_errors=True)
      reason = str(err).split(": Failed")[0] if isinstance(err, ValueError) else err.strerror
      full = "RESOURCE_EXHAUSTED" in str(err) or getattr(err, "errno", None) == errno.ENOSPC
      raise OSError(
        errno.ENOSPC if full else getattr(err, "errno", errno.EIO),
        f"cannot write the checkpoint of round {step} "
        f"({'no space left on device' if full else reason}); the run stopped and resumes "
        "from its last complete checkpoint",
        str(self.path / CHECKPOINTS),
      ) from None
    finally:
      absl.setLevel(level)
      sys.unraisablehook = unraisable

  def checkpoint_rows(self, manager) -> int | None:
    """The length of the clients axis in the newest checkpoint (it grows with the padding of
    the devices that wrote it), from orbax's metadata; ``None`` without a readable one."""
    import jax
    import orbax.checkpoint as ocp

    for step in sorted(manager.all_steps(), reverse=True):
      try:
        metadata = ocp.StandardCheckpointer().metadata(
          Path(manager.directory) / str(step) / "default"
        )
      except Exception:  # an unreadable checkpoint; restore_newest deals with it
        continue
      for leaf in jax.tree.leaves(metadata.item_metadata):
        if "client_params" in str(getattr(leaf, "name", "")).split("."):
          return int(leaf.shape[1])  # after the seeds axis
    return None

  def restore_newest(self, manager, abstract: Any) -> tuple[int, Any, list[str]] | None:
    """The newest checkpoint that restores against ``abstract`` (a tree of
    ``jax.ShapeDtypeStruct`` carrying the reader's shardings), as ``(round, state, notes)``;
    an unreadable one is moved aside to ``checkpoints/unreadable-<round>`` (not deleted; orbax
    would not write that round again while it is there), noted, and the one before it used."""
    import orbax.checkpoint as ocp

    notes = []
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as err:  # orbax raises many kinds for a damaged checkpoint
        aside = Path(manager.directory) / f"unreadable-{step}"
        if self.writer:
          (Path(manager.directory) / str(step)).rename(aside)
        manager.reload()
        notes.append(
          f"checkpoint at round {step} is unreadable ({type(err).__name__}); moved to {aside}"
        )
        continue
      return step, state, notes
    return None


_WRITE_FAILURES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "FAILED_PRECONDITION")
"""The status codes of tensorstore's errors that mean a checkpoint could not be written."""


def _quiet_unraisable(unraisable: Any) -> None:
  """Drops the "event loop is closed" errors of orbax's I/O callbacks after a failed write."""
  if not isinstance(unraisable.exc_value, RuntimeError):
    sys.__unraisablehook__(unraisable)


def warn_log_gaps(
  target: RunDir, seeds: Sequence[dict[str, Any]], logs: Sequence[list[dict[str, Any]]]
) -> None:
  """Warns, naming the rounds, when a finished run's metrics logs lack some of its rounds (a
  log damaged or deleted after the run): its summary stands (it comes from the models, not the
  log), but curves and times drawn from the log are incomplete.

  Args:
    target: the run directory.
    seeds: its seeds' summaries (``seed`` and ``rounds`` are read).
    logs: per seed, the records its metrics log holds (:meth:`RunDir.read_metrics`).
  """
  for summary, records in zip(seeds, logs, strict=True):
    gaps = missing_rounds(records, summary["rounds"])
    if gaps:
      shown = ", ".join(map(str, gaps[:6])) + (", ..." if len(gaps) > 6 else "")
      log.warning(
        f"{target.metrics_path(summary['seed'])} lacks {len(gaps)} of its {summary['rounds']} "
        f"rounds ({shown}): the summary stands, the loss curve and round times are incomplete"
      )


def missing_rounds(records: list[dict[str, Any]], before: int) -> list[int]:
  """The rounds ``0 .. before - 1`` that ``records`` (a metrics log) lack."""
  return sorted(set(range(before)) - {record["round"] for record in records})


SWEEP_INDEX = "sweep.json"
"""A sweep folder's index: every run's name, group and settings, in sweep order."""


def read_sweep_index(folder: Path) -> dict[str, dict[str, Any]]:
  """The sweep index of ``folder`` by run name (empty when it has none).

  Raises:
    ConfigError: naming the file, when it is unreadable.
  """
  path = Path(folder) / SWEEP_INDEX
  if not path.is_file():
    return {}
  entries = read_json(path)
  try:
    return {entry["name"]: entry for entry in entries}
  except (TypeError, KeyError) as err:
    raise ConfigError(f"{path} is not a sweep index ({err}); move it out of the way") from None


def write_sweep_index(folder: Path, entries: list[dict[str, Any]]) -> None:
  if is_process_zero():
    write_json(Path(folder) / SWEEP_INDEX, entries)


__all__ = [
  "RunDir",
  "is_process_zero",
  "missing_rounds",
  "read_json",
  "read_sweep_index",
  "warn_log_gaps",
  "write_json",
  "write_sweep_index",
  "write_text",
]
