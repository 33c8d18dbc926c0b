"""A sweep: a grid of run configurations from a spec file or a preset, run into one folder.

A spec is TOML (Python reads it without a dependency)::

    # Settings every run shares. Keys are the train.py flags' names with underscores
    # (fedvp_jax.cli.SETTINGS): RunConfig fields and FedGen's fields, side by side.
    [shared]
    dataset = "David-m10-h1"
    model = "transformer"
    rounds = 100

    # One table per configuration: ``name`` (its run directory and table label, default
    # the algorithm) and ``group`` (plots per group, default the algorithm), then settings.
    [[run]]
    name = "FedAvg b1"
    group = "FedAvg"
    algo = "fedavg"

    # Optional: every run is repeated for every combination of these values, and the
    # values are appended to its name ("FedAvg b1 lr=0.03").
    [grid]
    learning_rate = [0.01, 0.03]

Command-line overrides replace ``[shared]`` settings in every run; a setting that runs or the
grid set individually cannot be overridden (it would erase the differences between runs).
``weekly-table`` (:data:`PRESETS`) is the
researcher's comparison table written in this format.

A sweep folder holds ``sweep.json`` (every run's name, group and configuration), one run
directory per configuration (see :mod:`fedvp_jax.training`), and the table and plots of
:mod:`fedvp_jax.report`. A configuration whose run directory already holds a finished run with
the same settings is not recomputed; an interrupted one is resumed from its checkpoints; one
with other settings is an error unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedvp_jax.cli import with_settings
from fedvp_jax.errors import ConfigError, DivergenceError
from fedvp_jax.training import RunConfig, resume, run

WEEKLY_TABLE = """\
# The researcher's weekly comparison: every algorithm of the FedGen family beside local
# training, FedAvg and partial FedAvg, with full (beta 1) and blended (beta 0.5) updates, and
# the generator-based ones without and with 50 rounds of generator pretraining.
[shared]
dataset = "David-m10-h1"
model = "transformer"
num_users = 10
rounds = 100
times = 2
optimizer = "sgd"
learning_rate = 0.01
local_epochs = 10
batch_size = 64

[[run]]
name = "local"
algo = "local"

[[run]]
name = "FedAvg b1"
group = "FedAvg"
algo = "fedavg"

[[run]]
name = "FedAvg b0.5"
group = "FedAvg"
algo = "fedavg"
beta = 0.5

[[run]]
name = "partialFedAvg b1"
group = "partialFedAvg"
algo = "partial-fedavg"

[[run]]
name = "partialFedAvg b0.5"
group = "partialFedAvg"
algo = "partial-fedavg"
beta = 0.5

[[run]]
name = "FedGen b1"
group = "FedGen"
algo = "fedgen"

[[run]]
name = "FedGen b0.5"
group = "FedGen"
algo = "fedgen"
beta = 0.5

[[run]]
name = "FedGen b1 pretrain50"
group = "FedGen"
algo = "fedgen"
pretrain_epochs = 50

[[run]]
name = "FedGen b0.5 pretrain50"
group = "FedGen"
algo = "fedgen"
beta = 0.5
pretrain_epochs = 50

# localFedGen receives no model, so beta has nothing to blend.
[[run]]
name = "localFedGen"
group = "localFedGen"
algo = "local-fedgen"

[[run]]
name = "localFedGen pretrain50"
group = "localFedGen"
algo = "local-fedgen"
pretrain_epochs = 50

[[run]]
name = "partialFedGen b1"
group = "partialFedGen"
algo = "partial-fedgen"

[[run]]
name = "partialFedGen b0.5"
group = "partialFedGen"
algo = "partial-fedgen"
beta = 0.5

[[run]]
name = "partialFedGen b1 pretrain50"
group = "partialFedGen"
algo = "partial-fedgen"
pretrain_epochs = 50

[[run]]
name = "partialFedGen b0.5 pretrain50"
group = "partialFedGen"
algo = "partial-fedgen"
beta = 0.5
pretrain_epochs = 50
"""

PRESETS = {"weekly-table": WEEKLY_TABLE}
"""Built-in specs by name, as TOML text."""

# Where a run's data lives and how its clients are placed change nothing it computes, so a
# finished run is reused even when they differ.
_PLACEMENT = ("data_dir", "devices")


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
    ConfigError: when ``source`` is neither.
  """
  if source in PRESETS:
    return PRESETS[source], f"preset {source}"
  path = Path(source)
  if not path.is_file():
    raise ConfigError(
      f"{source}: no such spec file, and not a preset (presets: {', '.join(PRESETS)})"
    )
  return path.read_text(), str(path)


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
  per_run = {key for entry in entries for key in entry} | set(grid)
  clashes = sorted(set(overrides or {}) & per_run)
  if clashes:
    raise ConfigError(
      f"{label} sets {', '.join(clashes)} per run or in its grid, so the command line cannot "
      "override it for every run; copy the spec (--print-spec) and edit it instead"
    )
  base = with_settings(RunConfig(), shared, f"{label} [shared]")
  runs = []
  for index, entry in enumerate(entries):
    own = {key: value for key, value in entry.items() if key not in ("name", "group")}
    where = f"{label} run {index + 1}"
    if set(own) & set(grid):
      raise ConfigError(f"{where} sets {sorted(set(own) & set(grid))}, which the grid varies")
    name = str(entry.get("name", own.get("algo", base.algo)))
    group = str(entry.get("group", own.get("algo", base.algo)))
    for combination in itertools.product(*grid.values()):
      settings = dict(zip(grid, combination, strict=True))
      config = with_settings(base, {**own, **settings, **(overrides or {})}, where)
      suffix = " ".join(f"{key}={value}" for key, value in settings.items())
      runs.append(SweepRun(f"{name} {suffix}".strip(), group, config))
  names = [r.name for r in runs]
  for name in names:
    if names.count(name) > 1:
      raise ConfigError(f"{label}: two runs are named {name!r}; give each run its own name")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
      raise ConfigError(f"{label}: run name {name!r} must be a plain folder name")
  return runs


def run_sweep(
  runs: Sequence[SweepRun],
  out_dir: str | Path,
  *,
  overwrite: bool = False,
  checkpoint_every: int | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> dict[str, str]:
  """Runs every configuration into ``out_dir/<name>/``, skipping finished ones.

  Args:
    runs: the configurations (from :func:`expand_spec`).
    out_dir: the sweep folder.
    overwrite: rerun configurations whose folder holds a run with other settings.
    checkpoint_every: passed to :func:`fedvp_jax.training.run`, so a killed sweep resumes
      each run from its checkpoints.
    progress: progress lines on stderr.
    log: where human-readable lines go.

  Returns:
    Every run's outcome by name: ``"done"``, ``"reused"``, ``"diverged: <message>"``, or
    ``"diverged before"`` (a run that diverged in an earlier sweep is not repeated unless
    ``overwrite``).

  Raises:
    ConfigError: when a folder holds a run with other settings and not ``overwrite`` (checked
      for every run before any runs).
  """
  out_dir = Path(out_dir)
  plans = {r.name: _plan(r, out_dir / r.name, overwrite) for r in runs}
  out_dir.mkdir(parents=True, exist_ok=True)
  _update_index(out_dir / "sweep.json", runs)
  outcomes = {}
  for number, sweep_run in enumerate(runs, start=1):
    run_dir, plan = out_dir / sweep_run.name, plans[sweep_run.name]
    log(f"[{number}/{len(runs)}] {sweep_run.name}: {plan}")
    try:
      if plan in ("reuse", "diverged"):
        outcomes[sweep_run.name] = "reused" if plan == "reuse" else "diverged before"
        continue
      if plan == "resume":
        resume(
          run_dir,
          devices=sweep_run.config.devices,
          data_dir=sweep_run.config.data_dir,
          checkpoint_every=checkpoint_every,
          progress=progress,
          log=log,
        )
      else:
        if plan == "run" and run_dir.exists():
          run_dir.rmdir()  # empty, as _plan checked
        run(
          sweep_run.config,
          run_dir,
          overwrite=plan == "overwrite",
          checkpoint_every=checkpoint_every,
          progress=progress,
          log=log,
        )
      outcomes[sweep_run.name] = "done"
    except DivergenceError as err:  # one bad configuration does not stop the others
      log(f"  {sweep_run.name} diverged: {err}")
      outcomes[sweep_run.name] = f"diverged: {err}"
  return outcomes


def _update_index(path: Path, runs: Sequence[SweepRun]) -> None:
  """Adds ``runs`` to the sweep's index (a run of the same name is replaced; the index of runs
  from earlier invocations is kept, as their folders are)."""
  index = {}
  if path.is_file():
    try:
      index = {entry["name"]: entry for entry in json.loads(path.read_text())}
    except (ValueError, KeyError, TypeError) as err:
      raise ConfigError(f"{path} is not a sweep index ({err}); move it out of the way") from err
  for r in runs:
    index[r.name] = {"name": r.name, "group": r.group, "config": dataclasses.asdict(r.config)}
  path.write_text(json.dumps(list(index.values()), indent=2) + "\n")


def _plan(sweep_run: SweepRun, run_dir: Path, overwrite: bool) -> str:
  """What to do with one configuration: ``run``, ``reuse``, ``resume``, ``diverged`` (it did
  before; rerun with ``overwrite``) or ``overwrite``."""
  record_path = run_dir / "config.json"
  if not record_path.is_file():
    if run_dir.exists() and any(run_dir.iterdir()):
      raise ConfigError(f"{run_dir} exists and is not a run directory; move it out of the way")
    return "run"
  try:
    saved = json.loads(record_path.read_text())["config"]
  except (ValueError, KeyError) as err:
    raise ConfigError(f"{record_path} is unreadable ({err}); move {run_dir} aside") from err
  wanted = json.loads(json.dumps(dataclasses.asdict(sweep_run.config)))
  differences = [
    f"{key}: {saved.get(key)!r} there, {wanted[key]!r} now"
    for key in wanted
    if key not in _PLACEMENT and saved.get(key) != wanted[key]
  ]
  if differences:
    if overwrite:
      return "overwrite"
    raise ConfigError(
      f"{run_dir} holds a run with other settings ({'; '.join(differences)}); pass --overwrite "
      "to replace it, or choose another --out"
    )
  if (run_dir / "summary.json").is_file():
    return "reuse"
  if (run_dir / "diverged.json").is_file():
    return "overwrite" if overwrite else "diverged"
  return "resume"


__all__ = [
  "PRESETS",
  "WEEKLY_TABLE",
  "SweepRun",
  "expand_spec",
  "read_spec",
  "run_sweep",
]
