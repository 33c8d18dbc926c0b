"""The report's figures stay readable with a whole sweep in them: read back from matplotlib."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from matplotlib.colors import to_hex

from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.plots import plot_loss, plot_orthodromic
from fedvp_jax.report import RunResult, table_rows

PNG = b"\x89PNG\r\n\x1a\n"
GROUPS = ["local", "FedAvg", "FedGen", "partialFedAvg", "partialFedGen"]
ROUNDS = 60
# Runs settle between 0.00270 and 0.00284; constant-velocity lies near them, no-motion far.
BASELINES = {
  "no-motion": {"loss": 0.0103, "orthodromic_deg": [7.4, 9.1]},
  "constant-velocity": {"loss": 0.00288, "orthodromic_deg": [2.4, 3.3]},
}


def fake_run(k: int) -> RunResult:
  """The k-th of 15 runs, three per group: a decaying loss over two seeds; orthodromic error
  2.10° to 2.24° at step one, one degree more at step two."""
  rng = np.random.default_rng(k)
  rounds = np.arange(ROUNDS + 1)
  floor = 0.00270 + 1e-5 * k
  curves = floor + 0.002 * np.exp(-rounds / 5) + rng.normal(0, 2e-6, (2, ROUNDS + 1))
  degrees = [[2.10 + 0.01 * k + d, 3.10 + 0.01 * k + d] for d in (-0.002, 0.002)]
  summary = {
    "seeds": [
      {"final": {"loss": c[-1], "orthodromic_deg": deg}, "best_loss": c.min(), "best_round": 60}
      for c, deg in zip(curves, degrees)
    ],
    "beats_baselines": {"no-motion": [True, True], "constant-velocity": [True, True]},
  }
  config = to_record(RunConfig.of(algorithm="fedavg", beta=1.0, num_seeds=2, seed=0, rounds=ROUNDS))
  return RunResult(
    f"{GROUPS[k // 3]} run{k}", GROUPS[k // 3], config, summary, curves, BASELINES, 60.0, None
  )


@pytest.fixture(scope="module")
def results():
  return [fake_run(k) for k in range(15)]


@pytest.fixture(scope="module")
def loss_figure(results, tmp_path_factory):
  path = tmp_path_factory.mktemp("plots") / "loss.png"
  return plot_loss(results, path, "fake: test loss"), path


@pytest.fixture(scope="module")
def orthodromic_figure(results, tmp_path_factory):
  path = tmp_path_factory.mktemp("plots") / "orthodromic.png"
  return plot_orthodromic(table_rows(results), path, "fake: orthodromic error"), path


def panels(fig):
  return [ax for ax in fig.axes if ax.get_visible()]


def run_lines(ax):
  """The lines of named runs (not baselines, not the faint curves of other groups)."""
  return [
    line
    for line in ax.get_lines()
    if not line.get_label().startswith("_") and not (line.get_gid() or "").startswith("baseline")
  ]


def style(line):
  return to_hex(line.get_color()), line.get_linestyle(), line.get_marker()


def test_the_figures_are_png_files(loss_figure, orthodromic_figure):
  for _, path in (loss_figure, orthodromic_figure):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 20_000, path


def test_the_loss_has_one_panel_per_group_with_its_runs_in_its_legend(loss_figure, results):
  fig, _ = loss_figure
  axes = panels(fig)
  assert [ax.get_title() for ax in axes] == GROUPS
  for ax, group in zip(axes, GROUPS):
    names = [r.name for r in results if r.group == group]
    assert [line.get_label() for line in run_lines(ax)] == names
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [*names, "baseline constant-velocity 0.002880"]
  assert len({ax.get_ylim() for ax in axes}) == 1 and len({ax.get_xlim() for ax in axes}) == 1


def test_the_loss_axis_is_zoomed_onto_the_settled_runs(loss_figure, results):
  fig, _ = loss_figure
  bottom, top = panels(fig)[0].get_ylim()
  settled = np.concatenate([r.curves.mean(axis=0)[ROUNDS // 2 :] for r in results])
  assert bottom < settled.min() and settled.max() < top
  # Far from zero and tight: the runs, 0.00014 apart, fill most of the axis.
  assert bottom > 0.95 * settled.min() and top - bottom < 3 * np.ptp(settled)
  # The first rounds (0.0047) are off the top rather than squeezing the runs.
  assert top < results[0].curves[:, 0].mean()


def test_the_loss_baselines_are_labelled_lines_or_named(loss_figure):
  fig, _ = loss_figure
  for ax in panels(fig):
    (line,) = [x for x in ax.get_lines() if x.get_gid() == "baseline:constant-velocity"]
    assert line.get_ydata()[0] == pytest.approx(0.00288)
    assert not [x for x in ax.get_lines() if x.get_gid() == "baseline:no-motion"]
  assert "no-motion 0.010300 (above)" in fig.get_suptitle()


def test_no_two_runs_look_alike_and_each_keeps_its_style(loss_figure, orthodromic_figure):
  lines = [line for ax in panels(loss_figure[0]) for line in run_lines(ax)]
  assert len(lines) == 15
  assert len({style(line) for line in lines}) == 15
  # The whole palette of ten colours is used before a colour comes back.
  assert len({to_hex(line.get_color()) for line in lines}) == 10
  # Runs of one panel differ in colour, not only in line style or marker.
  for ax in panels(loss_figure[0]):
    assert len({to_hex(line.get_color()) for line in run_lines(ax)}) == len(run_lines(ax))
  loss_styles = {line.get_label(): style(line) for line in lines}
  for ax in panels(orthodromic_figure[0]):
    dots = run_lines(ax)
    assert len({(to_hex(d.get_color()), d.get_marker()) for d in dots}) == 15
    for dot in dots:  # the same colour and marker as in the loss figure
      color, _, marker = loss_styles[dot.get_label()]
      assert (to_hex(dot.get_color()), dot.get_marker()) == (color, marker)


def test_a_group_figure_is_its_panel_with_the_same_styles(results, loss_figure, tmp_path):
  path = tmp_path / "loss_FedGen.png"
  fig = plot_loss(results, path, "fake: FedGen", groups=["FedGen"])
  assert path.read_bytes()[:8] == PNG
  (ax,) = panels(fig)
  everywhere = {
    line.get_label(): style(line) for a in panels(loss_figure[0]) for line in run_lines(a)
  }
  here = {line.get_label(): style(line) for line in run_lines(ax)}
  assert list(here) == [r.name for r in results if r.group == "FedGen"]
  assert all(everywhere[name] == s for name, s in here.items())
  assert ax.get_ylim() == panels(loss_figure[0])[0].get_ylim()


def test_the_orthodromic_error_is_a_zoomed_panel_per_step(orthodromic_figure, results):
  fig, _ = orthodromic_figure
  axes = panels(fig)
  assert [ax.get_title() for ax in axes] == ["step 1", "step 2"]
  for step, ax in enumerate(axes):
    left, right = ax.get_xlim()
    means = np.array(
      [np.mean([s["final"]["orthodromic_deg"][step] for s in r.summary["seeds"]]) for r in results]
    )
    assert left < means.min() and means.max() < right
    assert left > 0.8 * means.min(), "the axis starts near zero"
    # 2.10° and 2.24° lie a good part of the axis apart.
    assert (means.max() - means.min()) / (right - left) > 0.25
    (line,) = [x for x in ax.get_lines() if x.get_gid() == "baseline:constant-velocity"]
    assert line.get_xdata()[0] == pytest.approx(
      BASELINES["constant-velocity"]["orthodromic_deg"][step]
    )
    assert any(t.get_text().startswith("constant-velocity ") for t in ax.texts)
    assert "no-motion" in ax.get_xlabel()
  assert [t.get_text() for t in axes[0].get_yticklabels()] == [r.name for r in results]


def test_importing_the_report_does_not_import_matplotlib():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  code = "import sys, fedvp_jax.report; sys.exit('matplotlib' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
