"""Metric records: one round's metrics as a JSON record, a seed's summary, a run's summary over
seeds, the mean ± std that tables show, and the verdict against the trivial predictors. Plain
numbers in, plain numbers out.

A run reports two models per seed: the ``final`` one (after the last round) and the
``selected`` one (the round with the lowest validation loss: what the run deploys). Verdicts
and gains are the selected model's; nothing is ever chosen on the test windows.

JSON has no NaN, so a non-finite number is written as ``null``; the standard deviation over a
single seed is undefined and written as ``null`` too (tables then show no ±).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedvp_jax.baselines import best_trivial
from fedvp_jax.metrics import ErrorSums, Summary, summarize


def finite_or_none(value: Any) -> float | None:
  """``value`` as a float, or ``None`` when it is not finite."""
  number = float(value)
  return number if math.isfinite(number) else None


def summary_dict(summary: Summary) -> dict[str, Any]:
  """A :class:`~fedvp_jax.metrics.Summary` as JSON-ready numbers."""
  return {
    "loss": finite_or_none(summary.loss),
    "orthodromic_deg": [finite_or_none(d) for d in np.asarray(summary.orthodromic_deg)],
  }


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``) over seeds; ``None`` counts as NaN, and
  the standard deviation of one value is NaN (undefined)."""
  array = np.array([np.nan if v is None else v for v in values], dtype=float)
  std = float(array.std(ddof=1)) if len(array) > 1 else math.nan
  return float(array.mean()), std


def round_record(r: int, metrics: Any) -> dict[str, Any]:
  """One seed's metrics of round ``r`` (counting from 0) as a JSON-ready record.

  Args:
    r: the round.
    metrics: that seed's :class:`~fedvp_jax.algorithms.RoundMetrics`, on the host.
  """
  record: dict[str, Any] = {
    "round": r,
    "train_loss": finite_or_none(metrics.train_loss),
    "excluded_clients": [
      int(i) for i in np.asarray(metrics.selected)[np.asarray(metrics.excluded)]
    ],
  }
  if bool(metrics.evaluated):
    record.update({f"test_{k}": v for k, v in summary_dict(summarize(metrics.test)).items()})
    if float(np.sum(metrics.validation.num_windows)) > 0:
      validation = summary_dict(summarize(metrics.validation))
      record["validation_loss"] = validation["loss"]
      record["validation_orthodromic_deg"] = validation["orthodromic_deg"]
  for name, value in metrics.extra.items():
    record[name] = finite_or_none(value)
  return record


def models_summary(
  final_test: ErrorSums,
  final_validation_loss: float,
  selected_round: int,
  selected_validation_loss: float,
  selected_test: ErrorSums,
) -> dict[str, Any]:
  """A seed summary's ``final`` and ``selected`` entries: the final models' test errors and
  validation loss, and the round, validation loss and test errors of the models selected on
  validation (NaN losses, as without a validation split, are written ``null``).

  Args:
    final_test: the final models' test error sums (a clients axis, on the host).
    final_validation_loss: their validation loss.
    selected_round: the round whose start the selected models are (the number of rounds when
      they are the final ones).
    selected_validation_loss: their validation loss.
    selected_test: their test error sums.
  """
  return {
    "final": summary_dict(summarize(final_test)),
    "final_validation_loss": finite_or_none(final_validation_loss),
    "selected": {
      "round": int(selected_round),
      "validation_loss": finite_or_none(selected_validation_loss),
      **summary_dict(summarize(selected_test)),
    },
  }


def gains_percent(
  orthodromic_deg: Sequence[float | None], baselines: dict[str, dict[str, Any]]
) -> list[float | None]:
  """Per horizon step, how much lower the model's mean great-circle error is than the best
  trivial predictor's, in percent of the latter (negative: worse)."""
  if not baselines:
    return [None] * len(orthodromic_deg)
  best = best_trivial({name: base["orthodromic_deg"] for name, base in baselines.items()})
  return [
    None if m is None or b is None or b == 0 else 100.0 * (b - m) / b
    for m, b in zip(orthodromic_deg, best, strict=True)
  ]


def beats_baselines(
  orthodromic_deg: Sequence[float | None], baselines: dict[str, dict[str, Any]]
) -> dict[str, list[bool]]:
  """Per baseline, whether the model's mean great-circle error is lower at each horizon step;
  ``"best"`` is the verdict against the best of them at each step (what counts)."""
  verdicts = {
    name: [
      m is not None and b is not None and m < b
      for m, b in zip(orthodromic_deg, base["orthodromic_deg"], strict=True)
    ]
    for name, base in baselines.items()
  }
  verdicts["best"] = [
    bool(verdicts) and all(wins[k] for wins in verdicts.values())
    for k in range(len(orthodromic_deg))
  ]
  return verdicts


def _over_seeds(values: Sequence[Sequence[float | None]]) -> tuple[list[Any], list[Any]]:
  """Per step, the mean and std over seeds of per-seed lists (``None`` where undefined)."""
  stats = [mean_std(step) for step in zip(*values, strict=True)]
  return [finite_or_none(m) for m, _ in stats], [finite_or_none(s) for _, s in stats]


def run_summary(
  config_record: dict[str, Any], baselines: dict[str, Any], seeds: list[dict[str, Any]]
) -> dict[str, Any]:
  """A run's ``summary.json``: its seeds' summaries, their means and stds (final and selected
  models), the selected model's gain over the best trivial predictor per step, and the
  verdicts."""
  loss = mean_std([s["final"]["loss"] for s in seeds])
  selected_loss = mean_std([s["selected"]["loss"] for s in seeds])
  final_deg, final_std = _over_seeds([s["final"]["orthodromic_deg"] for s in seeds])
  selected_deg, selected_std = _over_seeds([s["selected"]["orthodromic_deg"] for s in seeds])
  result = {
    "config": config_record,
    "baselines": baselines,
    "seeds": seeds,
    "final_loss_mean": finite_or_none(loss[0]),
    "final_loss_std": finite_or_none(loss[1]),
    "orthodromic_deg_mean": final_deg,
    "orthodromic_deg_std": final_std,
    "selected_loss_mean": finite_or_none(selected_loss[0]),
    "selected_loss_std": finite_or_none(selected_loss[1]),
    "selected_orthodromic_deg_mean": selected_deg,
    "selected_orthodromic_deg_std": selected_std,
    "selected_rounds": [s["selected"]["round"] for s in seeds],
    "gain_percent": gains_percent(selected_deg, baselines),
    "beats_baselines": beats_baselines(selected_deg, baselines),
  }
  if all("new_viewers" in s for s in seeds):
    new = [s["new_viewers"] for s in seeds]
    degrees, stds = _over_seeds([n["selected"]["orthodromic_deg"] for n in new])
    result["new_viewers"] = {
      "viewers": new[0]["viewers"],
      "baselines": new[0]["baselines"],
      "selected_orthodromic_deg_mean": degrees,
      "selected_orthodromic_deg_std": stds,
      "gain_percent": gains_percent(degrees, new[0]["baselines"]),
      "beats_baselines": beats_baselines(degrees, new[0]["baselines"]),
    }
  return result


__all__ = [
  "beats_baselines",
  "finite_or_none",
  "gains_percent",
  "mean_std",
  "models_summary",
  "round_record",
  "run_summary",
  "summary_dict",
]
