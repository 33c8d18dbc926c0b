"""Sweeps: spec files and the weekly-table preset, overrides, skipping finished runs,
resuming interrupted ones, refusing to overwrite; reports from saved metrics alone."""

import argparse
import csv
import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from fedvp_jax.cli.flags import add_settings, config_from, given_settings, parse_known
from fedvp_jax.config import SCHEMA, RunConfig
from fedvp_jax.errors import ConfigError
from fedvp_jax.report import load_run, markdown_table, table_rows, write_report
from fedvp_jax.sweep import PRESETS, expand_spec, run_sweep

TINY = """
[shared]
dataset = "Synthetic-m4-h2"
model = "lstm"
num_clients = 3
rounds = 3
num_seeds = 2
local_steps = 2
batch_size = 8
latent_dim = 12
grain = 16
heatmap_sigma = 30.0
gen_batch_size = 8
gen_steps = 2

[[run]]
name = "avg"
group = "plain"
algorithm = "fedavg"

[[run]]
name = "gen"
algorithm = "fedgen"
pretrain_rounds = 1
"""


def test_the_weekly_table_is_the_researchers_table():
  runs = expand_spec(PRESETS["weekly-table"], "preset weekly-table")
  described = {("local", 1.0, False)}
  for algo in ("fedavg", "partial-fedavg"):
    described |= {(algo, beta, False) for beta in (1.0, 0.5)}
  for algo in ("fedgen", "partial-fedgen"):
    described |= {(algo, beta, p) for beta in (1.0, 0.5) for p in (False, True)}
  described |= {("local-fedgen", 1.0, p) for p in (False, True)}  # no model to blend
  got = [
    (r.config.algorithm, r.config.round.beta, r.config.fedgen.pretrain_rounds > 0) for r in runs
  ]
  assert sorted(got) == sorted(described) and len(got) == len(set(got))
  names = [r.name for r in runs]
  assert {"local", "FedAvg-b1", "FedAvg-b0.5", "FedGen-b1-pretrain50"} <= set(names)
  assert not any(" " in name for name in names)
  for r in runs:
    assert (r.config.dataset, r.config.model, r.config.num_clients) == (
      "David-m10-h1",
      "transformer",
      10,
    )


def test_grid_runs_every_combination_with_overrides_on_top():
  spec = TINY + "\n[grid]\nlearning_rate = [0.01, 0.03]\nbeta = [1.0, 0.5]\n"
  runs = expand_spec(spec, "spec.toml", {"rounds": 5, "model": "transformer"})
  assert [r.name for r in runs[:4]] == [
    "avg-learning_rate=0.01-beta=1.0",
    "avg-learning_rate=0.01-beta=0.5",
    "avg-learning_rate=0.03-beta=1.0",
    "avg-learning_rate=0.03-beta=0.5",
  ]
  assert len(runs) == 8
  assert {(r.config.learning_rate, r.config.round.beta) for r in runs[4:]} == {
    (lr, b) for lr in (0.01, 0.03) for b in (1.0, 0.5)
  }
  assert all(r.config.rounds == 5 and r.config.model == "transformer" for r in runs)
  assert {r.group for r in runs} == {"plain", "fedgen"}
  assert runs[4].config.fedgen.pretrain_rounds == 1 and runs[4].config.fedgen.grain == 16


@pytest.mark.parametrize(
  ("spec", "overrides", "message"),
  [
    (
      TINY.replace("rounds = 3", "roundz = 3"),
      {},
      r"spec.toml \[shared\]: roundz: no such setting \(did you mean 'rounds'",
    ),
    pytest.param(
      TINY.replace("rounds = 3", "roundz = 3"),
      {},
      r"\[shared\].*roundz",
      id="unknown-key-names-its-table",
    ),
    (
      TINY.replace('algorithm = "fedgen"', 'algorithm = "fedgan"'),
      {},
      "spec.toml run 2: algorithm 'fedgan': choose one of",
    ),
    (TINY + "\n[[run]]\nname = 'avg'\n", {}, "two runs are named 'avg'"),
    (TINY.replace('name = "avg"', 'name = "a/b"'), {}, "must be a plain folder name"),
    (TINY + "\n[[run]]\nbeta = 2.0\n", {}, r"spec.toml run 3: beta 2\.0: must be in \(0, 1\]"),
    (
      TINY.replace("rounds = 3", "rounds = 3.5"),
      {},
      r"\[shared\]: rounds 3\.5: should be an integer",
    ),
    pytest.param(
      TINY.replace("rounds = 3", 'rounds = "3"'),
      {},
      r"\[shared\]: rounds '3': should be an integer",
      id="toml-string-for-an-int",
    ),
    (TINY + "\n[grid]\nbeta = 0.5\n", {}, "grid.*beta must be a non-empty list"),
    (TINY + "\n[extra]\n", {}, "unknown section"),
    ("[run]\nalgorithm = 'fedavg'\n", {}, r"write each run as \[\[run\]\]"),
    (TINY + "\n[grid]\npretrain_rounds = [0, 2]\n", {}, r"run 2 sets \['pretrain_rounds'\]"),
    ("[shared\n", {}, "not valid TOML"),
    (TINY, {"pretrain_rounds": 5}, "sets pretrain_rounds per run"),
  ],
)
def test_bad_specs_name_the_spec_and_what_is_wrong(spec, overrides, message):
  with pytest.raises(ConfigError, match=message):
    expand_spec(spec, "spec.toml", overrides)


def test_overrides_are_the_flags_given_and_defaults_match_run_config():
  parser = argparse.ArgumentParser()
  add_settings(parser)
  assert config_from(parser, given_settings(parser.parse_args([]))) == RunConfig()
  argv = ["weekly-table", "--out", "x", "--device", "cpu", "--rounds", "7", "--algorithm", "FedAvg"]
  given = parse_known([*argv, "--beta", "1", "--alpha", "2"])
  assert {name: SCHEMA[name].coerce(value, from_text=True) for name, value in given.items()} == {
    "rounds": 7,
    "algorithm": "fedavg",
    "beta": 1.0,
    "alpha": 2.0,
  }


def folder_state(folder):
  return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep") / "s"
  runs = expand_spec(TINY, "tiny")
  outcomes = run_sweep(runs, out, checkpoint_every=2)
  return runs, out, outcomes


def test_a_sweep_runs_everything_once_then_reuses_it(finished_sweep):
  runs, out, outcomes = finished_sweep
  assert outcomes == {"avg": "done", "gen": "done"}
  index = json.loads((out / "sweep.json").read_text())
  assert [(e["name"], e["group"]) for e in index] == [("avg", "plain"), ("gen", "fedgen")]
  before = {p: t for p, t in folder_state(out).items() if p.name != "sweep.json"}
  assert run_sweep(runs, out) == {"avg": "reused", "gen": "reused"}
  assert {p: t for p, t in folder_state(out).items() if p.name != "sweep.json"} == before


def test_other_settings_in_the_same_folder_are_refused_unless_overwrite(finished_sweep, tmp_path):
  runs, out, _ = finished_sweep
  changed = [dataclasses.replace(r, config=r.config.replace(rounds=4)) for r in runs]
  before = folder_state(out)
  with pytest.raises(ConfigError, match=r"avg holds a run with other settings \(rounds: 3 -> 4\)"):
    run_sweep(changed, out)
  assert folder_state(out) == before
  # Where the data lives changes nothing computed: such runs are reused.
  moved = [dataclasses.replace(r, config=r.config.replace(data_dir=str(tmp_path))) for r in runs]
  assert set(run_sweep(moved, out).values()) == {"reused"}


def test_overwrite_replaces_only_the_runs_whose_settings_changed(tmp_path):
  runs = expand_spec(TINY, "tiny")
  out = tmp_path / "s"
  run_sweep(runs, out)
  kept = folder_state(out / "gen")
  changed = [dataclasses.replace(runs[0], config=runs[0].config.replace(rounds=2))]
  assert run_sweep([*changed, runs[1]], out, overwrite=True) == {
    "avg": "done",
    "gen": "reused",
  }
  assert folder_state(out / "gen") == kept
  assert json.loads((out / "avg" / "summary.json").read_text())["seeds"][0]["rounds"] == 2
  # The index keeps every run that has a folder; a run of the same name is replaced.
  index = json.loads((out / "sweep.json").read_text())
  assert [(e["name"], e["config"]["rounds"]) for e in index] == [("avg", 2), ("gen", 3)]
  run_sweep(changed, out)
  assert [e["name"] for e in json.loads((out / "sweep.json").read_text())] == ["avg", "gen"]


def test_a_run_that_diverged_is_reported_and_not_repeated(tmp_path):
  runs = expand_spec(TINY, "tiny")[:1]
  out = tmp_path / "s"
  run_sweep(runs, out)
  for path in (out / "avg").rglob("summary.json"):  # as training leaves a diverged run
    path.unlink()
  (out / "avg" / "diverged.json").write_text(json.dumps({"message": "round 1: NaN"}))
  before = folder_state(out / "avg")
  assert run_sweep(runs, out) == {"avg": "diverged before"}
  assert folder_state(out / "avg") == before
  assert "| avg | fedavg | 1 |  | 3 | 2 | diverged |" in markdown_table(
    table_rows([load_run(out / "avg")])
  )


def test_an_interrupted_sweep_resumes_its_unfinished_run(tmp_path, caplog):
  runs = expand_spec(TINY, "tiny")[:1]
  out = tmp_path / "s"
  run_sweep(runs, out, checkpoint_every=2)
  summary = json.loads((out / "avg" / "summary.json").read_text())
  for path in (out / "avg").rglob("summary.json"):
    path.unlink()
  caplog.set_level(logging.INFO, logger="fedvp_jax")
  assert run_sweep(runs, out) == {"avg": "done"}
  lines = [record.getMessage() for record in caplog.records if record.name == "fedvp_jax"]
  assert any("resuming from the checkpoint at round 2" in line for line in lines)
  again = json.loads((out / "avg" / "summary.json").read_text())
  for before, after in zip(summary["seeds"], again["seeds"], strict=True):
    assert after["final"]["loss"] == pytest.approx(before["final"]["loss"], rel=1e-6)


def test_the_report_is_computed_from_the_saved_metrics(finished_sweep, tmp_path):
  _, out, _ = finished_sweep
  rows = write_report(out)
  with (out / "results.csv").open() as file:
    table = {row["run"]: row for row in csv.DictReader(file)}
  for name in ("avg", "gen"):
    summary = json.loads((out / name / "summary.json").read_text())
    finals = [s["final"]["loss"] for s in summary["seeds"]]
    assert float(table[name]["final_loss_mean"]) == pytest.approx(np.mean(finals))
    assert float(table[name]["final_loss_std"]) == pytest.approx(np.std(finals, ddof=1))
    selected = [s["selected"]["loss"] for s in summary["seeds"]]
    assert float(table[name]["selected_loss_mean"]) == pytest.approx(np.mean(selected))
    step1 = [s["selected"]["orthodromic_deg"][0] for s in summary["seeds"]]
    assert float(table[name]["orthodromic_deg_step1_mean"]) == pytest.approx(np.mean(step1))
  baselines = json.loads((out / "avg" / "baselines.json").read_text())
  assert float(table["baseline: constant-velocity"]["final_loss_mean"]) == pytest.approx(
    baselines["constant-velocity"]["loss"]
  )
  assert [r["run"] for r in rows][:2] == ["avg", "gen"]
  markdown = (out / "results.md").read_text()
  assert "| avg | fedavg | 1 |" in markdown and "| gen | fedgen | 1 | 1 | 4 | 2 |" in markdown
  for png in ("loss.png", "loss_plain.png", "loss_fedgen.png", "orthodromic.png"):
    data = (out / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_report_script_on_run_dirs_and_its_errors(finished_sweep, tmp_path):
  _, out, _ = finished_sweep
  script = [sys.executable, str(REPO / "scripts" / "report.py")]
  done = subprocess.run(
    [*script, str(out / "avg"), str(out / "gen"), "--out", str(tmp_path / "r")],
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stderr
  assert "| avg |" in (tmp_path / "r" / "results.md").read_text()
  bad = subprocess.run(
    [*script, str(tmp_path / "nothing")], capture_output=True, text=True, check=False
  )
  assert bad.returncode == 2 and "not a run directory" in bad.stderr


def load_sweep_script():
  spec = importlib.util.spec_from_file_location("sweep_script", REPO / "scripts" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sweep_script_prints_the_preset_and_rejects_unknown_specs(capsys, tmp_path):
  sweep = load_sweep_script()
  assert sweep.main(["weekly-table", "--print-spec"]) == 0
  printed = capsys.readouterr().out
  (tmp_path / "copy.toml").write_text(printed)
  assert sweep.main([str(tmp_path / "copy.toml"), "--dry-run", "--rounds", "9"]) == 0
  listing, programs = (lines := capsys.readouterr().out.splitlines())[:15], lines[15:]
  # The FedAvg family and the FedGen family: two compiled programs.
  assert [line.split(":")[0:2] for line in programs] == [
    ["program 1", " 5 run(s)"],
    ["program 2", " 10 run(s)"],
  ]
  assert sum(line.endswith(" 9 rounds x2") for line in listing) == 10
  assert sum(line.endswith(" 59 rounds x2") for line in listing) == 5  # 50 pretraining rounds
  for memory in ("0", "lots", "inf"):
    with pytest.raises(SystemExit) as exit_code:
      sweep.main(["weekly-table", "--dry-run", "--group-memory", memory])
    assert exit_code.value.code == 2
    assert "--group-memory: " in capsys.readouterr().err
  assert sweep.main(["weekly-table", "--dry-run", "--no-grouping"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 15
  assert sweep.main(["weekly-tabel"]) == 2
  assert "not a preset (presets: weekly-table)" in capsys.readouterr().err
