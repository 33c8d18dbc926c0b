"""Metric records: one round's metrics as a JSON record, a seed's summary, a run's summary over
seeds, and the mean ± std that tables show. Plain numbers in, plain numbers out.

JSON has no NaN, so a non-finite number is written as ``null``; the standard deviation over a
single seed is undefined and written as ``null`` too (tables then show no ±).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedvp_jax.metrics import Summary, summarize


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
  for name, value in metrics.extra.items():
    record[name] = finite_or_none(value)
  return record


def best_round(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """``{"loss", "round"}`` of the evaluated round with the lowest test loss among ``records``
  (``inf`` and ``None`` when none was evaluated)."""
  best: dict[str, Any] = {"loss": math.inf, "round": None}
  for record in records:
    if record.get("test_loss") is not None and record["test_loss"] < best["loss"]:
      best = {"loss": record["test_loss"], "round": record["round"]}
  return best


def beats_baselines(
  orthodromic_deg: Sequence[float | None], baselines: dict[str, dict[str, Any]]
) -> dict[str, list[bool]]:
  """Per baseline, whether the model's mean great-circle error is lower at each horizon step."""
  return {
    name: [
      m is not None and b is not None and m < b
      for m, b in zip(orthodromic_deg, base["orthodromic_deg"], strict=True)
    ]
    for name, base in baselines.items()
  }


def run_summary(
  config_record: dict[str, Any], baselines: dict[str, Any], seeds: list[dict[str, Any]]
) -> dict[str, Any]:
  """A run's ``summary.json``: its seeds' summaries, their mean and std, and the verdicts."""
  loss = mean_std([s["final"]["loss"] for s in seeds])
  degrees = [
    mean_std(step) for step in zip(*(s["final"]["orthodromic_deg"] for s in seeds), strict=True)
  ]
  mean_degrees = [finite_or_none(m) for m, _ in degrees]
  return {
    "config": config_record,
    "baselines": baselines,
    "seeds": seeds,
    "final_loss_mean": finite_or_none(loss[0]),
    "final_loss_std": finite_or_none(loss[1]),
    "orthodromic_deg_mean": mean_degrees,
    "orthodromic_deg_std": [finite_or_none(s) for _, s in degrees],
    "beats_baselines": beats_baselines(mean_degrees, baselines),
  }


__all__ = [
  "beats_baselines",
  "best_round",
  "finite_or_none",
  "mean_std",
  "round_record",
  "run_summary",
  "summary_dict",
]
