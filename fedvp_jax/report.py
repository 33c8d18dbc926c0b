"""Tables and plots of finished runs, from what their run directories hold and nothing else.

For a set of run directories (a sweep folder's, or any), :func:`write_report` writes

* ``results.md`` and ``results.csv``: per configuration the final Average Global Loss, the
  one of the model selected on validation (with its round), that model's orthodromic error per
  horizon step and its gain over the best trivial predictor there, each as mean ± std over
  seeds, the wall time, and whether it beats the best of the trivial predictors at every step;
  the baselines as rows of their own;
* ``loss.png``: test loss against round for every configuration (mean over seeds, a band of
  ± one std), one panel per group, and ``loss_<group>.png`` with the one group's panel;
* ``orthodromic.png``: orthodromic error per horizon step, every configuration and baseline.

The figures are :mod:`fedvp_jax.plots`'s.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.errors import ConfigError
from fedvp_jax.plots import plot_loss, plot_orthodromic
from fedvp_jax.rundir import RunDir, read_sweep_index, warn_log_gaps
from fedvp_jax.summaries import mean_std

log = logging.getLogger("fedvp_jax")


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What one run directory holds.

  Attributes:
    name: the run's label (its directory's name).
    group: its group (from the sweep's ``sweep.json``; the algorithm otherwise).
    config: its settings by name (:func:`fedvp_jax.config.to_record`).
    summary: its ``summary.json``, or ``None`` when it did not finish.
    curves: ``f32[seeds, rounds + 1]`` test loss of every seed after every number of
      aggregations, 0 to ``rounds`` (NaN where it was not evaluated).
    baselines: its ``baselines.json``.
    seconds: the time its rounds took (their ``seconds`` in ``metrics.jsonl``: compilation
      included, and every process of a resumed run counted).
    diverged: the message of a run that stopped because it diverged, else ``None``.
  """

  name: str
  group: str
  config: dict[str, Any]
  summary: dict[str, Any] | None
  curves: np.ndarray
  baselines: dict[str, Any]
  seconds: float
  diverged: str | None


def find_runs(paths: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
  """The run directories among ``paths`` (a sweep folder stands for its runs, in sweep order),
  each with its sweep group if known.

  Raises:
    ConfigError: for a path that is neither a run directory nor a folder holding some.
  """
  found: list[tuple[Path, str | None]] = []
  for path in map(Path, paths):
    index = read_sweep_index(path) if path.is_dir() else {}
    if RunDir(path).exists():
      found.append((path, None))
    elif index:
      found.extend((path / n, e["group"]) for n, e in index.items() if RunDir(path / n).exists())
    elif path.is_dir() and any(RunDir(p).exists() for p in path.iterdir()):
      found.extend((p, None) for p in sorted(path.iterdir()) if RunDir(p).exists())
    else:
      raise ConfigError(f"{path}: not a run directory or a folder of them (no config.json)")
  return found


def load_run(run_dir: str | Path, group: str | None = None) -> RunResult:
  """Reads one run directory (see :mod:`fedvp_jax.rundir`).

  Raises:
    ConfigError: naming the file, when a file the run needs is unreadable.
  """
  target = RunDir(run_dir)
  config: RunConfig = target.read_config()
  baselines = target.read_baselines()
  summary = target.read_summary()
  seeds = [config.seed + k for k in range(config.num_seeds)]
  rounds = config.total_rounds
  curves = np.full((len(seeds), rounds + 1), np.nan)
  seconds = 0.0
  logs = [target.read_metrics(seed) for seed in seeds]
  for k, records in enumerate(logs):
    for record in records:
      if record.get("test_loss") is not None and record["round"] < rounds:
        curves[k, record["round"]] = record["test_loss"]
      if k == 0:  # the seeds of a run share their rounds
        seconds += record.get("seconds") or 0.0
  if summary is not None:
    warn_log_gaps(target, summary["seeds"], logs)
    for k, seed_summary in enumerate(summary["seeds"]):
      final = seed_summary["final"]["loss"]
      curves[k, seed_summary["rounds"]] = np.nan if final is None else final
  return RunResult(
    target.name,
    group or config.algorithm,
    to_record(config),
    summary,
    curves,
    baselines,
    seconds,
    target.diverged(),
  )


def _pretrain(config: dict[str, Any]) -> int:
  """Stage-one rounds of a run's settings (only the FedGen family has them)."""
  from fedvp_jax.config import ALGORITHMS

  return config["pretrain_rounds"] if ALGORITHMS[config["algorithm"]].generator else 0


def _pm(mean_std: tuple[float, float], spec: str) -> str:
  mean, std = mean_std
  if math.isnan(mean):
    return "—"
  return format(mean, spec) + ("" if math.isnan(std) else f" ± {format(std, spec)}")


def table_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
  """One row of numbers per run (finished or not), then one per baseline of the first run."""
  rows = []
  for result in results:
    config = result.config
    row: dict[str, Any] = {
      "run": result.name,
      "group": result.group,
      "algorithm": config["algorithm"],
      "beta": config["beta"],
      "pretrain": _pretrain(config),
      "rounds": result.curves.shape[1] - 1,
      "seeds": config["num_seeds"],
    }
    summary = result.summary
    if summary is None:
      rows.append({**row, "status": "diverged" if result.diverged else "unfinished"})
      continue
    seeds = summary["seeds"]
    row["status"] = "done"
    row["final_loss"] = mean_std([s["final"]["loss"] for s in seeds])
    row["selected_loss"] = mean_std([s["selected"]["loss"] for s in seeds])
    row["selected_round"] = sorted({s["selected"]["round"] for s in seeds})
    per_step = zip(*(s["selected"]["orthodromic_deg"] for s in seeds), strict=True)
    row["orthodromic_deg"] = [mean_std(step) for step in per_step]
    row["gain_percent"] = summary["gain_percent"]
    row["wall_seconds"] = result.seconds
    # A run of a sweep's group shares its rounds' time with the group's other runs.
    row["runs_together"] = seeds[0].get("runs_together", 1)
    row["beats"] = {name: all(wins) for name, wins in summary["beats_baselines"].items()}
    row["privacy"] = summary.get("privacy")
    rows.append(row)
  if results:
    for name, baseline in results[0].baselines.items():
      rows.append(
        {
          "run": f"baseline: {name}",
          "status": "baseline",
          "final_loss": (baseline["loss"], math.nan),
          "orthodromic_deg": [(d, math.nan) for d in baseline["orthodromic_deg"]],
        }
      )
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a Markdown table (orthodromic error and gain at every step up to 5, else at
  the first, middle and last)."""
  steps = max((len(r["orthodromic_deg"]) for r in rows if "orthodromic_deg" in r), default=0)
  shown = list(range(steps)) if steps <= 5 else [0, steps // 2 - 1, steps - 1]
  head = [
    "run",
    "algorithm",
    "beta",
    "pretrain",
    "rounds (pretrain included)",
    "seeds",
    "Average Global Loss (final)",
    "selected on validation (round)",
    *[f"orthodromic deg, step {k + 1}" for k in shown],
    *[f"gain % over best trivial, step {k + 1}" for k in shown],
    "wall time",
    "beats best trivial",
  ]
  private = any(row.get("privacy") for row in rows)
  if private:  # only tables with a DP run show the guarantee
    head.append("DP ε (δ; σ)")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row["run"]]
    if row["status"] == "baseline":
      cells += [""] * 5
    else:
      cells += [row["algorithm"], f"{row['beta']:g}", str(row["pretrain"] or "")]
      cells += [str(row["rounds"]), str(row["seeds"])]
    if row["status"] in ("unfinished", "diverged"):
      cells += [row["status"]] + [""] * (len(head) - len(cells) - 1)
      lines.append("| " + " | ".join(cells) + " |")
      continue
    cells.append(_pm(row["final_loss"], ".6f"))
    if row["status"] == "baseline":
      cells.append("")
    else:
      rounds = "/".join(str(r) for r in row["selected_round"])
      cells.append(f"{_pm(row['selected_loss'], '.6f')} ({rounds})")
    # Runs of a sweep may predict different horizons: a step a run lacks shows as a dash.
    degrees = row["orthodromic_deg"]
    cells += [_pm(degrees[k], ".3f") if k < len(degrees) else "—" for k in shown]
    if row["status"] == "baseline":
      cells += [""] * (len(shown) + 2 + private)
    else:
      gains = row["gain_percent"]
      cells += ["—" if k >= len(gains) or gains[k] is None else f"{gains[k]:+.1f}" for k in shown]
      verdict = "yes" if row["beats"].get("best") else "NO"
      together = row["runs_together"]
      shared = f" ({together} runs together)" if together > 1 else ""
      cells += [f"{row['wall_seconds'] / 60:.1f} min{shared}", verdict]
      if private:
        cells.append(_guarantee(row["privacy"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _guarantee(privacy: dict[str, Any] | None) -> str:
  """A run's DP guarantee as a table cell; ∞ without DP."""
  if privacy is None:
    return "∞"
  return f"{privacy['epsilon']:.2f} ({privacy['delta']:g}; {privacy['noise_multiplier']:.3g})"


PRIVACY_COLUMNS = ("epsilon", "delta", "noise_multiplier", "clip_norm", "clients_per_round")
"""The CSV's columns of a DP run's accounting (empty for runs without DP)."""


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
  """The rows as CSV, one column per number (orthodromic error per step, means and stds)."""
  steps = max((len(r["orthodromic_deg"]) for r in rows if "orthodromic_deg" in r), default=0)
  fields = ["run", "group", "status", "algorithm", "beta", "pretrain", "rounds", "seeds"]
  fields += ["final_loss_mean", "final_loss_std", "selected_loss_mean", "selected_loss_std"]
  fields += ["selected_rounds"]
  fields += [f"orthodromic_deg_step{k + 1}_{s}" for k in range(steps) for s in ("mean", "std")]
  fields += [f"gain_percent_step{k + 1}" for k in range(steps)]
  fields += ["wall_seconds", "runs_together", "beats_best_trivial", *PRIVACY_COLUMNS]
  with path.open("w", newline="") as file:
    writer = csv.DictWriter(file, fields)
    writer.writeheader()
    for row in rows:
      out = {k: row[k] for k in fields if k in row}
      for name in ("final_loss", "selected_loss"):
        if name in row:
          out[f"{name}_mean"], out[f"{name}_std"] = row[name]
      if "selected_round" in row:
        out["selected_rounds"] = " ".join(str(r) for r in row["selected_round"])
      for k, (mean, std) in enumerate(row.get("orthodromic_deg", [])):
        out[f"orthodromic_deg_step{k + 1}_mean"] = mean
        out[f"orthodromic_deg_step{k + 1}_std"] = std
      for k, gain in enumerate(row.get("gain_percent", [])):
        out[f"gain_percent_step{k + 1}"] = "" if gain is None else gain
      if "beats" in row:
        out["beats_best_trivial"] = row["beats"].get("best")
      if row.get("privacy"):
        out.update({name: row["privacy"][name] for name in PRIVACY_COLUMNS})
      writer.writerow(
        {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}
      )


def write_report(*paths: str | Path, out_dir: str | Path | None = None) -> list[dict[str, Any]]:
  """Writes the table and plots of the runs in ``paths`` into ``out_dir``.

  Args:
    paths: run directories and folders of them (a sweep folder keeps its order and groups).
    out_dir: where the files go; by default the single folder given.

  Returns:
    The table's rows.

  Raises:
    ConfigError: when ``paths`` hold no run, or ``out_dir`` is needed but not given.
  """
  if out_dir is None:
    if len(paths) != 1 or RunDir(paths[0]).exists():
      raise ConfigError("give --out: the report of several folders, or of one run, needs one")
    out_dir = paths[0]
  results = [load_run(run_dir, group) for run_dir, group in find_runs(paths)]
  if not results:
    raise ConfigError(f"no runs in {', '.join(map(str, paths))}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = table_rows(results)
  dataset = results[0].config["dataset"]
  (out_dir / "results.md").write_text(markdown_table(rows))
  write_csv(rows, out_dir / "results.csv")
  plot_loss(results, out_dir / "loss.png", f"{dataset}: test loss per round")
  for group in dict.fromkeys(r.group for r in results):
    if all(r.group == group for r in results):
      break  # the one panel of loss.png already
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", group)
    plot_loss(results, out_dir / f"loss_{safe}.png", f"{dataset}: {group}", groups=[group])
  plot_orthodromic(rows, out_dir / "orthodromic.png", f"{dataset}: orthodromic error")
  log.info(markdown_table(rows))
  log.info(f"table and plots written to {out_dir}")
  return rows


__all__ = [
  "RunResult",
  "find_runs",
  "load_run",
  "markdown_table",
  "table_rows",
  "write_csv",
  "write_report",
]
