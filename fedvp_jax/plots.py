"""Figures of finished runs, drawn from :mod:`fedvp_jax.report`'s runs and table rows.

Made to stay readable with a whole sweep (15 configurations and more) in them:

* every run keeps one style, a (colour, line style, marker) of its own, in every figure, so a
  configuration is found again from one figure to the next;
* the test loss is drawn as small multiples, one panel per group on shared axes;
* the axes are zoomed onto the runs, where the differences between configurations live; a
  baseline near them is a labelled reference line, one far from them is named with its value
  in the figure's text.

matplotlib is imported inside the functions (importing the package needs none), and figures
are drawn on an Agg canvas of their own rather than through pyplot, so that a report never
changes the backend or the open figures of the process it runs in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
  from matplotlib.figure import Figure

  from fedvp_jax.report import RunResult

# tab10, told apart also in print, with black for its grey: grey is for the baselines and for
# the faint curves of other groups. The seven markers, a number prime to ten, make
# (colour, marker) differ between any two of the first seventy runs; the line style changes
# with every ten runs, so that two runs of one colour differ in it too (up to forty runs).
_COLORS = (
  "#1f77b4",
  "#ff7f0e",
  "#2ca02c",
  "#d62728",
  "#9467bd",
  "#8c564b",
  "#e377c2",
  "#000000",
  "#bcbd22",
  "#17becf",
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKS_PER_CURVE = 8
# A baseline is drawn inside the axes when it lies within this many times the runs' own spread
# of them; further away it would squeeze the runs into a sliver, so it is named instead.
_NEAR = 2.0


class _Style(NamedTuple):
  color: str
  linestyle: str
  marker: str


def _styles(count: int) -> list[_Style]:
  """The style of the k-th run of a report, the same in each of its figures."""
  return [
    _Style(
      _COLORS[k % len(_COLORS)],
      _LINESTYLES[k // len(_COLORS) % len(_LINESTYLES)],
      _MARKERS[k % len(_MARKERS)],
    )
    for k in range(count)
  ]


def _limits(
  values: np.ndarray, references: dict[str, float], below: float = 0.08, above: float = 0.08
) -> tuple[float, float, dict[str, float], dict[str, float]]:
  """Axis limits around ``values``, taking in the references near them.

  Args:
    values: what the axis must show.
    references: baselines by name, shown when near ``values``.
    below, above: the margins, as fractions of the range shown.

  Returns:
    The lower and upper limit, the references inside them and those left out.
  """
  finite = values[np.isfinite(values)]
  low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  # Runs closer together than half a percent of their values (or a single run) are not
  # magnified further: that would make noise look like a difference.
  spread = max(high - low, 0.005 * abs(high)) or 1.0
  inside = {
    n: v for n, v in references.items() if low - _NEAR * spread <= v <= high + _NEAR * spread
  }
  outside = {n: v for n, v in references.items() if n not in inside}
  low, high = min([low, *inside.values()]), max([high, *inside.values()])
  if high - low < spread:
    middle = (low + high) / 2
    low, high = middle - spread / 2, middle + spread / 2
  shown = high - low
  return low - below * shown, high + above * shown, inside, outside


def _off_scale(outside: dict[str, float], shown_from: float, spec: str, sep: str) -> str:
  """Names the baselines left out of an axis, with their values and on which side they lie."""
  return sep.join(
    f"{name} {value:{spec}} ({'above' if value > shown_from else 'below'})"
    for name, value in outside.items()
  )


def _figure(width: float, height: float) -> Figure:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def plot_loss(
  results: Sequence[RunResult], path: Path, title: str, groups: Sequence[str] | None = None
) -> Figure:
  """Test loss against round, one panel per group: every run's mean over seeds, a ± std band.

  The panels share their axes, zoomed onto the second half of every run of ``results``, where
  they settle and differ (their first rounds come in from above), so that a group's figure has
  the scale of the whole report's. The other groups' runs are faint grey curves behind. A
  baseline near the runs is a dashed line named in every legend; one far from them is named in
  the title. Runs keep their style in every figure of the same ``results``.

  Args:
    results: the runs of the report, in its order.
    path: the PNG to write.
    title: the figure's title.
    groups: the groups to draw, one panel each; by default every group of ``results``.

  Returns:
    The figure, already saved.
  """
  styles = _styles(len(results))
  groups = list(groups or dict.fromkeys(r.group for r in results))
  members = {g: [k for k, r in enumerate(results) if r.group == g] for g in groups}
  curves = {}
  settled = []
  for k, result in enumerate(results):
    evaluated = ~np.all(np.isnan(result.curves), axis=0)
    if evaluated.any():
      seeds = result.curves[:, evaluated]
      mean = np.nanmean(seeds, axis=0)
      std = np.nanstd(seeds, axis=0, ddof=1) if seeds.shape[0] > 1 else None
      curves[k] = (np.flatnonzero(evaluated), mean, std)
      settled.append(mean[len(mean) // 2 :])
  baselines = results[0].baselines if results else {}
  references = {n: b["loss"] for n, b in baselines.items() if b["loss"] is not None}
  # Headroom above the runs shows them arriving from their first rounds and keeps the legends
  # clear of the curves.
  bottom, top, inside, outside = _limits(
    np.concatenate(settled) if settled else np.array([]), references, below=0.1, above=0.6
  )

  columns = min(3, len(groups)) or 1
  rows = math.ceil(len(groups) / columns) or 1
  fig = _figure(max(9.0, 5.0 * columns), 3.8 * rows + 0.8)  # a lone panel gets room to read
  axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
  for ax in axes[len(groups) :]:
    ax.set_visible(False)
  for ax, group in zip(axes, groups, strict=False):
    # The other groups' runs, faint and unnamed, place this group's among all of them.
    for k, (rounds, mean, _) in curves.items():
      if results[k].group != group:
        ax.plot(rounds, mean, color="0.6", linewidth=0.7, alpha=0.5, zorder=1)
    for k in members[group]:
      if k not in curves:
        continue
      rounds, mean, std = curves[k]
      style = styles[k]
      every = max(1, len(mean) // _MARKS_PER_CURVE)
      # Marks of runs in one panel start at different rounds so that they do not sit on top of
      # each other where the curves meet.
      ax.plot(
        rounds,
        mean,
        color=style.color,
        linestyle=style.linestyle,
        marker=style.marker,
        markevery=(k * every // 5 % every, every),
        markersize=5,
        linewidth=1.4,
        label=results[k].name,
      )
      if std is not None:
        ax.fill_between(rounds, mean - std, mean + std, color=style.color, alpha=0.12)
    for name, loss in inside.items():
      ax.axhline(
        loss,
        color="0.35",
        linestyle=(0, (6, 3)),
        linewidth=1,
        label=f"baseline {name} {loss:.6f}",
        gid=f"baseline:{name}",
      )
    ax.set_title(group, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
  axes[0].set_ylim(bottom, top)
  axes[0].ticklabel_format(axis="y", style="plain", useOffset=False)
  note = _off_scale(outside, top, ".6f", ", ")
  fig.suptitle(
    title + ", mean ± std over seeds" + (f"\nbaselines off the scale: {note}" if note else "")
  )
  fig.supxlabel("round (models after that many aggregations)")
  fig.supylabel("Average Global Loss (test MSE)")
  fig.savefig(path, dpi=120)
  return fig


def _shown_steps(steps: int) -> list[int]:
  """The horizon steps given a panel: all up to four, else the first, middle and last, as in
  the report's table."""
  return list(range(steps)) if steps <= 4 else [0, steps // 2 - 1, steps - 1]


def plot_orthodromic(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Figure:
  """Orthodromic error: a dot (mean) and bar (± std) per run, one panel per horizon step.

  Runs are listed down the panels in the table's order, with the style they have in the loss
  figure; each panel is zoomed onto its step's values, the baselines as labelled lines.

  Args:
    rows: :func:`fedvp_jax.report.table_rows`'s rows; unfinished runs are left out.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    The figure, already saved.
  """
  runs = [r for r in rows if r["status"] != "baseline"]
  styles = _styles(len(runs))
  shown = [(r, styles[k]) for k, r in enumerate(runs) if "orthodromic_deg" in r]
  baselines = [r for r in rows if r["status"] == "baseline"]
  steps = _shown_steps(max((len(r["orthodromic_deg"]) for r, _ in shown), default=0))

  height = 1.4 + 0.32 * max(len(shown), 3)
  fig = _figure(2.0 + 3.6 * max(len(steps), 1), height)
  axes = fig.subplots(1, max(len(steps), 1), sharey=True, squeeze=False).ravel()
  groups = [r.get("group") for r, _ in shown]
  for ax, step in zip(axes, steps, strict=False):
    means = np.array([r["orthodromic_deg"][step][0] for r, _ in shown])
    stds = np.nan_to_num(np.array([r["orthodromic_deg"][step][1] for r, _ in shown]))
    references = {
      b["run"].removeprefix("baseline: "): b["orthodromic_deg"][step][0] for b in baselines
    }
    low, high, inside, outside = _limits(np.concatenate([means - stds, means + stds]), references)
    for y, ((row, style), mean, std) in enumerate(zip(shown, means, stds, strict=True)):
      ax.errorbar(mean, y, xerr=std, color=style.color, capsize=2, linewidth=1.2)
      ax.plot(
        mean,
        y,
        color=style.color,
        marker=style.marker,
        linestyle="none",
        label=row["run"],
        zorder=3,
      )
      ax.annotate(
        f"{mean:.3f}",
        (mean, y),
        xytext=(0, 5),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7,
      )
    # A thin line between groups: runs of one group sit together, as in the table.
    for y in range(1, len(groups)):
      if groups[y] != groups[y - 1]:
        ax.axhline(y - 0.5, color="0.8", linewidth=0.8)
    for name, value in inside.items():
      ax.axvline(value, color="0.35", linestyle=(0, (6, 3)), linewidth=1, gid=f"baseline:{name}")
      ax.annotate(
        f"{name} {value:.3f}",
        (value, 1),
        xycoords=("data", "axes fraction"),
        xytext=(-3, -3),
        textcoords="offset points",
        rotation=90,
        ha="right",
        va="top",
        fontsize=8,
        color="0.35",
      )
    ax.set_xlim(low, high)
    ax.set_title(f"step {step + 1}")
    # One baseline a line: the labels of panels side by side must not run into each other.
    note = _off_scale(outside, high, ".3f", "\n")
    ax.set_xlabel("orthodromic error (degrees)" + (f"\noff the scale:\n{note}" if note else ""))
    ax.grid(True, axis="x", alpha=0.3)
  axes[0].set_yticks(range(len(shown)), [r["run"] for r, _ in shown])
  axes[0].set_ylim(len(shown) - 0.5, -0.7)  # the first run on top, room for its value
  fig.suptitle(title + ", mean ± std over seeds")
  fig.savefig(path, dpi=120)
  return fig


__all__ = ["plot_loss", "plot_orthodromic"]
