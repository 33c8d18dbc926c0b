"""A sweep: a grid of run configurations from a spec file or a preset, run into one folder.

A spec is TOML (Python reads it without a dependency)::

    # Settings every run shares. Keys are the settings' names (fedvp_jax.config.SCHEMA; the
    # flags' names with underscores, e.g. learning_rate, local_steps, pretrain_rounds).
    [shared]
    dataset = "David-m10-h1"
    model = "transformer"
    rounds = 100

    # One table per configuration: ``name`` (its run directory and table label, default
    # the algorithm) and ``group`` (plots per group, default the algorithm), then settings.
    [[run]]
    name = "FedAvg-b1"
    group = "FedAvg"
    algorithm = "fedavg"

    # Optional: every run is repeated for every combination of these values, and the
    # values are appended to its name ("FedAvg-b1-learning_rate=0.03").
    [grid]
    learning_rate = [0.01, 0.03]

Command-line overrides replace ``[shared]`` settings in every run; a setting that runs or the
grid set individually cannot be overridden (it would erase the differences between runs).
Presets (:data:`PRESETS`, files in ``fedvp_jax/presets/``) are specs shipped with the package;
``weekly-table`` is the researcher's comparison table.

A sweep folder holds ``sweep.json`` (every run's name, group and configuration), one run
directory per configuration (:mod:`fedvp_jax.rundir`), and the table and plots of
:mod:`fedvp_jax.report`. A configuration whose run directory already holds a finished run with
the same settings is not recomputed; an interrupted one is resumed from its checkpoints; one
with other settings is an error unless ``overwrite``. Every run's data is checked before any
trains; a run that fails (bad data, divergence) is recorded and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import itertools
import logging
import tomllib
from collections.abc import Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedvp_jax import distributed
from fedvp_jax.config import (
  RunConfig,
  differences,
  program_groups,
  resolve_name,
  to_record,
  with_settings,
)
from fedvp_jax.errors import ConfigError, DivergenceError, FedVPError, SettingError
from fedvp_jax.rundir import RunDir, is_process_zero, read_sweep_index, write_sweep_index
from fedvp_jax.runner import (
  Progress,
  can_share,
  drain,
  group_steps,
  resume_steps,
  run_steps,
)

log = logging.getLogger("fedvp_jax")

PRESETS = {
  path.name.removesuffix(".toml"): path.read_text()
  for path in importlib.resources.files("fedvp_jax.presets").iterdir()
  if path.name.endswith(".toml")
}
"""Built-in specs by name, as TOML text: the files shipped in ``fedvp_jax/presets/``."""


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One configuration of a sweep.

  Attributes:
    name: its run directory's name and its label in tables and plots.
    group: the plot it is drawn on besides the overall one.
    config: what it runs.
  """

  name: str
  group: str
  config: RunConfig


def read_spec(source: str) -> tuple[str, str]:
  """``(text, label)`` of a preset name or a spec file path.

  Raises:
    ConfigError: when ``source`` is neither, or the file is empty.
  """
  if source in PRESETS:
    return PRESETS[source], f"preset {source}"
  path = Path(source)
  if not path.is_file():
    raise ConfigError(
      f"{source}: no such spec file, and not a preset (presets: {', '.join(PRESETS)})"
    )
  text = path.read_text()
  if not text.strip():
    raise ConfigError(f"{path} is empty: a spec needs at least a [shared] or [[run]] table")
  return text, str(path)


def _settings(settings: Mapping[str, Any], base: RunConfig, where: str) -> RunConfig:
  try:
    return with_settings(base, settings)
  except SettingError as err:
    raise ConfigError(f"{where}: {err}") from None


def expand_spec(
  text: str, label: str, overrides: Mapping[str, Any] | None = None
) -> list[SweepRun]:
  """Every configuration a TOML spec describes (see the module docstring), in spec order.

  Args:
    text: the spec.
    label: names the spec in errors (a file path or ``preset NAME``).
    overrides: settings that replace ``[shared]``'s in every run (the command line's).

  Raises:
    ConfigError: naming ``label`` and the run, for bad TOML, unknown keys or bad values, two
      runs with the same name, or an override of a setting that runs set individually.
  """
  try:
    spec = tomllib.loads(text)
  except tomllib.TOMLDecodeError as err:
    raise ConfigError(f"{label}: not valid TOML: {err}") from err
  unknown = set(spec) - {"shared", "run", "grid"}
  if unknown:
    raise ConfigError(f"{label}: unknown section(s) {sorted(unknown)}; use shared, run, grid")
  shared = spec.get("shared", {})
  entries = spec.get("run", [{}])
  grid = spec.get("grid", {})
  if not isinstance(entries, list):
    raise ConfigError(f"{label}: write each run as [[run]] (a list of tables), not [run]")
  for key, values in grid.items():
    if not isinstance(values, list) or not values:
      raise ConfigError(f"{label}: [grid] {key} must be a non-empty list of values")
  names = _setting_names(shared, grid, entries, label, overrides or {})
  base = _settings(shared, RunConfig(), f"{label} [shared]")
  runs = []
  for index, entry in enumerate(entries):
    own = {key: value for key, value in entry.items() if key not in ("name", "group")}
    where = f"{label} run {index + 1}"
    varied = {names[k] for k in own} & {names[k] for k in grid}
    if varied:
      raise ConfigError(f"{where} sets {sorted(varied)}, which the grid varies")
    for combination in itertools.product(*grid.values()):
      settings = dict(zip(grid, combination, strict=True))
      config = _settings({**own, **settings, **(overrides or {})}, base, where)
      name = str(entry.get("name", config.algorithm))
      group = str(entry.get("group", config.algorithm))
      suffix = "-".join(f"{key}={value}" for key, value in settings.items())
      runs.append(SweepRun(f"{name}-{suffix}" if suffix else name, group, config))
  _check_run_names(runs, label)
  return runs


def _setting_names(
  shared: dict[str, Any],
  grid: dict[str, Any],
  entries: list[dict[str, Any]],
  label: str,
  overrides: Mapping[str, Any],
) -> dict[str, str]:
  """Every key of the spec with its setting's name, each unknown key reported with its table;
  refuses overrides of settings that runs or the grid set individually."""
  names = {
    **_canonical_names(shared, f"{label} [shared]"),
    **_canonical_names(grid, f"{label} [grid]"),
  }
  for index, entry in enumerate(entries):
    own_keys = [k for k in entry if k not in ("name", "group")]
    names.update(_canonical_names(own_keys, f"{label} run {index + 1}"))
  per_run = {names[key] for entry in entries for key in entry if key in names} | {
    names[key] for key in grid
  }
  clashes = sorted(set(overrides) & per_run)
  if clashes:
    raise ConfigError(
      f"{label} sets {', '.join(clashes)} per run or in its grid, so the command line cannot "
      "override it for every run; copy the spec (--print-spec) and edit it instead"
    )
  return names


def _check_run_names(runs: Sequence[SweepRun], label: str) -> None:
  """Refuses two runs of one name and names that are not plain folder names."""
  run_names = [r.name for r in runs]
  for name in run_names:
    if run_names.count(name) > 1:
      raise ConfigError(f"{label}: two runs are named {name!r}; give each run its own name")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
      raise ConfigError(f"{label}: run name {name!r} must be a plain folder name")


def _canonical_names(keys: Iterable[str], label: str) -> dict[str, str]:
  """Every key's setting name (legacy names accepted).

  Raises:
    ConfigError: naming ``label``, for an unknown key.
  """
  try:
    return {key: resolve_name(key) for key in keys}
  except SettingError as err:
    raise ConfigError(f"{label}: {err}") from None


SweepSteps = Generator[tuple[str, Progress], None, dict[str, str]]
"""Yields ``(run name, Progress)``; returns every run's outcome by name."""


def run_sweep(runs: Sequence[SweepRun], out_dir: str | Path, **options: Any) -> dict[str, str]:
  """Runs every configuration; arguments as :func:`sweep_steps`."""
  return drain(sweep_steps(runs, out_dir, **options))  # type: ignore[arg-type]


def sweep_steps(
  runs: Sequence[SweepRun],
  out_dir: str | Path,
  *,
  overwrite: bool = False,
  grouping: bool = True,
  memory_limit: int | None = None,
  **run_options: Any,
) -> SweepSteps:
  """Runs every configuration into ``out_dir/<name>/``, skipping finished ones.

  Configurations that can share a compiled program (equal
  :func:`~fedvp_jax.config.program_key`, see :func:`run_groups`) run as one
  (:func:`fedvp_jax.runner.group_steps`): the weekly table is two programs, the FedAvg family
  and the FedGen family. Each still writes its own run directory, as if it had run alone.

  Args:
    runs: the configurations (from :func:`expand_spec`).
    out_dir: the sweep folder.
    overwrite: rerun configurations whose folder holds a run with other settings.
    grouping: run configurations that can share a program as one; ``False``: each alone.
    memory_limit: the most bytes one group's program may take (more runs than fit run as
      several programs; default :func:`fedvp_jax.runner.memory_limit_bytes`).
    run_options: ``checkpoint_every`` (so that a killed sweep resumes each run from its
      checkpoints) and ``tensorboard``, for every run (see :func:`fedvp_jax.runner.run_steps`).

  Returns:
    Every run's outcome by name: ``"done"``, ``"reused"``, ``"diverged: <message>"``,
    ``"diverged before"`` (a run that diverged in an earlier sweep is not repeated unless
    ``overwrite``) or ``"failed: <message>"`` (its data or settings could not serve it).

  Raises:
    ConfigError: when a folder holds a run with other settings and not ``overwrite`` (checked
      for every run before any runs).
  """
  out_dir = Path(out_dir)
  plans = {r.name: _plan(r, RunDir(out_dir / r.name), overwrite) for r in runs}
  problems = _check_data(runs)
  # The processes of a job plan from the same folder, before process 0 changes it.
  distributed.barrier(f"plan {out_dir}")
  try:
    if is_process_zero():
      out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise ConfigError(f"cannot create the sweep folder {out_dir}: {err}") from None
  index = read_sweep_index(out_dir)
  index.update(
    {r.name: {"name": r.name, "group": r.group, "config": to_record(r.config)} for r in runs}
  )
  write_sweep_index(out_dir, list(index.values()))
  outcomes: dict[str, str] = {}
  for number, sweep_run in enumerate(runs, start=1):
    plan = plans[sweep_run.name]
    log.info(f"[{number}/{len(runs)}] {sweep_run.name}: {plan}")
    if sweep_run.name in problems:
      outcomes[sweep_run.name] = f"failed: {problems[sweep_run.name]}"
      log.info(f"  {sweep_run.name} failed: {problems[sweep_run.name]}")
    elif plan in ("reuse", "diverged"):
      outcomes[sweep_run.name] = "reused" if plan == "reuse" else "diverged before"
  pending = [r for r in runs if r.name not in outcomes]
  for group in run_groups(pending) if grouping else [[r] for r in pending]:
    try:
      results = yield from _group_steps(group, out_dir, plans, overwrite, memory_limit, run_options)
    except FedVPError as err:  # one bad configuration does not stop the others
      # ... but in a job of several processes only a divergence, which every process sees
      # alike, does; a process that failed alone stops the job (a JobError says which).
      if distributed.is_multiprocess() and not isinstance(err, DivergenceError):
        raise
      # Runs of the group that had finished before the error keep their results.
      finished = [RunDir(out_dir / r.name).is_finished() for r in group]
      results = [{} if done else err for done in finished]
    for r, result in zip(group, results, strict=True):
      outcomes[r.name] = _outcome(r, result)
  return {r.name: outcomes[r.name] for r in runs}


def _outcome(sweep_run: SweepRun, result: Any) -> str:
  """A run's outcome (see :func:`sweep_steps`) from its summary or the error that stopped it."""
  if not isinstance(result, FedVPError):
    return "done"
  kind = "diverged" if isinstance(result, DivergenceError) else "failed"
  log.info(f"  {sweep_run.name} {kind}: {result}")
  return f"{kind}: {result}"


def run_groups(runs: Sequence[SweepRun]) -> list[list[SweepRun]]:
  """``runs`` in the groups that run as one program: those of equal
  :func:`~fedvp_jax.config.program_key` that can share one (on one device, without DP, whose
  noise follows each run's rounds, and without ``patience``, which stops each run on its own);
  every other run alone. In order of each group's first run."""
  if distributed.is_multiprocess():
    return [[r] for r in runs]
  shareable = [can_share(r.config) for r in runs]
  alone = [[r] for r, ok in zip(runs, shareable, strict=True) if not ok]
  candidates = [r for r, ok in zip(runs, shareable, strict=True) if ok]
  groups = program_groups([r.config for r in candidates])
  # Placement is not in the program key, but a group reads its data from one folder.
  together = [
    [candidates[i] for i in group if candidates[i].config.data_dir == data_dir]
    for group in groups
    for data_dir in dict.fromkeys(candidates[i].config.data_dir for i in group)
  ]
  order = {r.name: i for i, r in enumerate(runs)}
  return sorted(together + alone, key=lambda group: order[group[0].name])


def _group_steps(
  group: Sequence[SweepRun],
  out_dir: Path,
  plans: Mapping[str, str],
  overwrite: bool,
  memory_limit: int | None,
  run_options: Mapping[str, Any],
) -> Generator[tuple[str, Progress], None, list[Any]]:
  """Runs ``group`` (one run, or runs that share a program), yielding each run's progress by
  name; every run's summary or the :class:`DivergenceError` that stopped it."""
  for r in group:
    target = RunDir(out_dir / r.name)
    if plans[r.name] == "run" and target.path.exists() and target.writer:
      target.path.rmdir()  # empty, as _plan checked
  if len(group) == 1:
    (sweep_run,) = group
    target, config = RunDir(out_dir / sweep_run.name), sweep_run.config
    if plans[sweep_run.name] == "resume":
      steps = resume_steps(
        target.path, devices=config.devices, data_dir=config.data_dir, **run_options
      )
    else:
      steps = run_steps(
        config, target.path, overwrite=plans[sweep_run.name] == "overwrite", **run_options
      )
    with contextlib.closing(steps):  # a close() of the sweep reaches the run's files
      try:
        while True:
          yield sweep_run.name, next(steps)
      except StopIteration as stop:
        return [stop.value]
      except DivergenceError as err:
        return [err]
  together = group_steps(
    [r.config for r in group],
    [out_dir / r.name for r in group],
    [plans[r.name] == "resume" for r in group],
    overwrite=overwrite,
    memory_limit=memory_limit,
    **run_options,
  )
  with contextlib.closing(together):
    try:
      while True:
        i, progress = next(together)
        yield group[i].name, progress
    except StopIteration as stop:
      return stop.value


def _check_data(runs: Sequence[SweepRun]) -> dict[str, str]:
  """Every run whose data cannot serve it, with why: found before any run trains, so that a
  bad dataset in the last run does not wait for the others to finish."""
  from fedvp_jax.data.datasets import load_traces, parse_spec
  from fedvp_jax.data.federated import select_users

  problems = {}
  for r in runs:
    c = r.config
    try:
      # A process of a job reads only its own clients' traces, when it runs them.
      names_only = () if distributed.is_multiprocess() else None
      traces = load_traces(parse_spec(c.dataset), c.data_dir, seed=c.seed, users=names_only)
      select_users(traces, c.num_clients, c.users, seed=c.seed)
    except FedVPError as err:
      problems[r.name] = str(err)
  return problems


def _plan(sweep_run: SweepRun, target: RunDir, overwrite: bool) -> str:
  """What to do with one configuration: ``run``, ``reuse``, ``resume``, ``diverged`` (it did
  before; rerun with ``overwrite``) or ``overwrite``."""
  if not target.exists():
    if target.path.exists() and any(target.path.iterdir()):
      raise ConfigError(f"{target.path} exists and is not a run directory; move it out of the way")
    return "run"
  changed = differences(target.read_config(), sweep_run.config)
  if changed:
    if overwrite:
      return "overwrite"
    raise ConfigError(
      f"{target.path} holds a run with other settings ({'; '.join(changed)}); pass --overwrite "
      "to replace it, or choose another --out"
    )
  if target.is_finished():
    return "reuse"
  if target.diverged() is not None:
    return "overwrite" if overwrite else "diverged"
  return "resume"


__all__ = [
  "PRESETS",
  "SweepRun",
  "expand_spec",
  "read_spec",
  "run_groups",
  "run_sweep",
  "sweep_steps",
]
