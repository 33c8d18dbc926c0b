"""A sweep runs configurations that differ only in settings held as values as one program
(issue 12), and every run's folder holds what the run alone would have written."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import TINY_RUN, compiles

from fedvp_jax.config import SCHEMA, RunConfig, get
from fedvp_jax.report import write_report
from fedvp_jax.runner import run
from fedvp_jax.sweep import PRESETS, expand_spec, run_sweep, sweep_steps

# TINY_RUN's settings, as a sweep's overrides (those that differ from the defaults).
TINY = {
  name: get(TINY_RUN, name) for name in SCHEMA if get(TINY_RUN, name) != get(RunConfig(), name)
}

# Three runs of the FedAvg family, of different lengths: one program.
FAMILY = """
[shared]
dataset = "Synthetic-m4-h2"
model = "lstm"
num_clients = 3
num_seeds = 2
local_steps = 2
batch_size = 8

[[run]]
name = "short"
algorithm = "fedavg"
rounds = 2

[[run]]
name = "blended"
algorithm = "fedavg"
beta = 0.5
rounds = 5

[[run]]
name = "local"
algorithm = "local"
learning_rate = 0.02
rounds = 5
"""

TIMINGS = ("seconds", "runs_together")


def flat(tree, path=""):
  """``tree``'s leaves by path, without wall-clock times (no two runs share them)."""
  if isinstance(tree, dict):
    items = [(f"{path}/{k}", v) for k, v in tree.items() if not k.endswith(TIMINGS)]
  elif isinstance(tree, list):
    items = [(f"{path}[{i}]", v) for i, v in enumerate(tree)]
  else:
    return {path: tree}
  return {p: leaf for key, value in items for p, leaf in flat(value, key).items()}


def assert_same(mine, theirs, where):
  mine, theirs = flat(mine), flat(theirs)
  assert mine.keys() == theirs.keys(), where
  for path, value in theirs.items():
    if isinstance(value, float):
      assert mine[path] == pytest.approx(value, rel=1e-4, abs=1e-7), f"{where}: {path}"
    else:
      assert mine[path] == value, f"{where}: {path}"


def assert_same_run(grouped, alone, seeds=(0, 1)):
  """Two run directories hold the same run: summary and every round's metrics, to float
  rounding."""
  read = lambda folder: json.loads((folder / "summary.json").read_text())
  assert_same(read(grouped), read(alone), f"{grouped.name}: summary.json")
  for seed in seeds:
    log = lambda folder: (folder / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
    records = [[json.loads(line) for line in log(folder)] for folder in (grouped, alone)]
    assert_same(*records, f"{grouped.name}: seed {seed}'s metrics")


def test_the_weekly_table_sweeps_as_two_programs_each_run_as_if_alone(tmp_path):
  """The weekly-table preset (its pretraining shortened to 2 rounds, on tiny synthetic data,
  one seed) compiles two round programs, and runs of each family, the frozen shorter ones
  among them, write what they write alone."""
  text = PRESETS["weekly-table"].replace("pretrain_rounds = 50", "pretrain_rounds = 2")
  runs = expand_spec(text, "weekly-table", {**TINY, "rounds": 3, "num_seeds": 1})
  with compiles("run") as compiled:
    outcomes = run_sweep(runs, tmp_path / "table")
  assert set(outcomes.values()) == {"done"}
  assert len(compiled) == 2, compiled
  summary = json.loads((tmp_path / "table" / "FedGen-b1" / "summary.json").read_text())
  assert summary["seeds"][0]["runs_together"] == 10
  # The table says whose time a grouped run's wall time is.
  rows = {row["run"]: row for row in write_report(tmp_path / "table")}
  assert {rows[r.name]["runs_together"] for r in runs} == {5, 10}
  assert "min (10 runs together) |" in (tmp_path / "table" / "results.md").read_text()
  by_name = {r.name: r for r in runs}
  # A FedAvg-family run, and a FedGen one frozen while the pretraining runs went on.
  for name in ("partialFedAvg-b0.5", "FedGen-b1"):
    run(by_name[name].config, tmp_path / "alone" / name)
    assert_same_run(tmp_path / "table" / name, tmp_path / "alone" / name, seeds=[0])


@pytest.fixture(scope="module")
def family_alone(tmp_path_factory):
  """Every run of FAMILY, each run alone."""
  out = tmp_path_factory.mktemp("alone")
  assert set(run_sweep(expand_spec(FAMILY, "family"), out, grouping=False).values()) == {"done"}
  return out


def test_a_sweep_killed_mid_group_resumes_every_run(tmp_path, family_alone, caplog):
  runs = expand_spec(FAMILY, "family")
  steps = sweep_steps(runs, tmp_path, checkpoint_every=2)
  for name, progress in steps:
    if name == "local" and progress.done == 3:
      break
  steps.close()  # killed after round 3: "short" has finished, the others hold round 2
  assert (tmp_path / "short" / "summary.json").exists()
  assert not (tmp_path / "local" / "summary.json").exists()
  caplog.set_level(logging.INFO, logger="fedvp_jax")
  outcomes = run_sweep(runs, tmp_path)
  assert outcomes == {"short": "reused", "blended": "done", "local": "done"}
  lines = [record.getMessage() for record in caplog.records if record.name == "fedvp_jax"]
  assert sum("resuming from the checkpoint at round 2" in line for line in lines) == 2
  assert any(line.startswith("2 runs as one program") for line in lines)
  for r in runs:
    assert_same_run(tmp_path / r.name, family_alone / r.name)


def test_a_run_that_diverges_stops_alone_and_its_group_goes_on(tmp_path):
  # A learning rate of 1e30 with the MSE loss turns the local models' updates non-finite.
  bad = FAMILY.replace("[shared]", '[shared]\nloss = "mse"')
  runs = expand_spec(bad.replace("learning_rate = 0.02", "learning_rate = 1e30"), "family")
  outcomes = run_sweep(runs, tmp_path)
  assert outcomes["local"].startswith("diverged: ")
  assert (tmp_path / "local" / "diverged.json").exists()
  assert not (tmp_path / "local" / "summary.json").exists()
  assert {outcomes["short"], outcomes["blended"]} == {"done"}
  # The others' rounds are their own (the MSE loss makes them other runs than family_alone's).
  run(runs[1].config, tmp_path / "alone")
  assert_same_run(tmp_path / runs[1].name, tmp_path / "alone")


def test_a_group_too_large_for_memory_is_split_and_says_how(tmp_path, family_alone, caplog):
  caplog.set_level(logging.INFO, logger="fedvp_jax")
  runs = expand_spec(FAMILY, "family")
  assert set(run_sweep(runs, tmp_path, memory_limit=1).values()) == {"done"}
  lines = [record.getMessage() for record in caplog.records if record.name == "fedvp_jax"]
  split = [line for line in lines if "split into groups of" in line]
  assert len(split) == 2, lines  # 3 runs -> 1 + 2, then the 2 -> 1 + 1
  assert "more than the 0.0 GiB allowed: split into groups of 1 and 2" in split[0]
  for r in runs:
    assert_same_run(tmp_path / r.name, family_alone / r.name)
