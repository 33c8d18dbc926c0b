"""scripts/train.py (fedvp train) end to end: every algorithm, researcher flags, bad input."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

TINY = (
  "--dataset Synthetic-m4-h2 --num_users 3 --rounds 2 --local_epochs 2 --batch_size 8 "
  "--model lstm --latent-dim 12 --no-progress"
).split()
FEDGEN_TINY = "--grain 16 --heatmap-sigma 30 --gen_batch_size 8 --gen-steps 2".split()


def load_script():
  spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def train_main():
  return load_script().main


def read_run(run_dir):
  summary = json.loads((run_dir / "summary.json").read_text())
  seeds = sorted(p for p in run_dir.iterdir() if p.name.startswith("seed"))
  metrics = [
    [json.loads(line) for line in (s / "metrics.jsonl").read_text().splitlines()] for s in seeds
  ]
  return summary, metrics


@pytest.mark.parametrize(
  "algo",
  ["local", "fedavg", "partial-fedavg", "fedgen", "local-fedgen", "partial-fedgen"],
)
def test_every_algorithm_runs(train_main, tmp_path, capsys, algo):
  extra = FEDGEN_TINY + ["--pretrain-rounds", "1"] if "fedgen" in algo else []
  code = train_main(TINY + extra + ["--algorithm", algo, "--out", str(tmp_path), "--name", "run"])
  assert code == 0
  run_dir = tmp_path / "run"
  for name in ("config.json", "baselines.json", "summary.json"):
    assert (run_dir / name).is_file()
  summary, (metrics,) = read_run(run_dir)
  expected_rounds = 3 if "fedgen" in algo else 2
  assert [m["round"] for m in metrics] == list(range(expected_rounds))
  assert np.isfinite(summary["final_loss_mean"])
  assert summary["final_loss_std"] is None  # one seed: no spread, not 0
  assert len(summary["orthodromic_deg_mean"]) == 2
  selected = summary["selected_orthodromic_deg_mean"]
  for name, baseline in summary["baselines"].items():
    wins = summary["beats_baselines"][name]
    assert wins == [m < b for m, b in zip(selected, baseline["orthodromic_deg"])]
  assert summary["beats_baselines"]["best"] == [
    all(m < b["orthodromic_deg"][k] for b in summary["baselines"].values())
    for k, m in enumerate(selected)
  ]
  config = json.loads((run_dir / "config.json").read_text())
  assert config["config"]["algorithm"] == algo and len(config["users"]) == 3
  if "fedgen" in algo:
    assert metrics[0]["generator_weight"] == 0.0 and metrics[-1]["generator_weight"] > 0
  out = capsys.readouterr().out
  assert "baseline no-motion" in out and "Average Global Loss" in out


def test_researchers_command_as_written(train_main, tmp_path, capsys):
  command = (
    "--train --dataset Synthetic-m4-h1 --algorithm partialFedGen --beta 0.5 --model Transformer "
    "--embedding --device cuda --learning_rate 0.01 --batch_size 8 --gen_batch_size 16 --times 2 "
    "--num_glob_iters 2 --local_epochs 2 --num_users 3 --grain 16"
  )
  argv = command.split()
  with pytest.warns(UserWarning, match="no GPU") if not _has_gpu() else _Nothing():
    code = train_main(
      argv + ["--out", str(tmp_path), "--name", "r", "--no-progress", "--gen-steps", "2"]
    )
  assert code == 0
  summary, metrics = read_run(tmp_path / "r")
  assert len(metrics) == 2 and len(summary["seeds"]) == 2
  assert summary["config"]["algorithm"] == "partial-fedgen" and summary["config"]["embedding"]
  losses = [s["final"]["loss"] for s in summary["seeds"]]
  np.testing.assert_allclose(summary["final_loss_mean"], np.mean(losses))
  np.testing.assert_allclose(summary["final_loss_std"], np.std(losses, ddof=1))
  assert "±" in capsys.readouterr().out


def _has_gpu():
  import jax

  return any(d.platform == "gpu" for d in jax.devices())


class _Nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--beta", "1.5"], "argument --beta: 1.5: must be in (0, 1]"),
    (["--beta", "0"], "argument --beta: 0.0: must be in (0, 1]"),
    (["--clients-per-round", "5"], "argument --clients-per-round: 5: exceeds the 3 clients"),
    (["--algorithm", "FedProx"], "argument --algorithm: FedProx: choose one of local, fedavg"),
    (["--model", "gru"], "argument --model: gru: choose one of lstm, transformer"),
    (["--dataset", "David-m0-h1"], "must be at least 1"),
    (["--rounds", "0"], "argument --rounds: 0: must be at least 1"),
    (["--grain", "15"], "argument --grain: 15: must be an even integer >= 4"),
    (["--seed", "-1"], "argument --seed: -1: must be at least 0"),
    (["--users", ","], "argument --users: (): the list of viewers is empty"),
    (["--name", "."], "must be a plain folder name"),
    (["--name", "a/b"], "must be a plain folder name"),
    (["--learning_rate", "inf"], "argument --learning-rate: inf: must be a positive number"),
    (["--alpha", "inf"], "argument --alpha: inf: must be a finite number >= 0"),
    (
      ["--users", "0,1", "--clients-per-round", "3"],
      "--clients-per-round: 3: exceeds the 2 clients",
    ),
  ],
)
def test_impossible_flags_are_rejected(train_main, tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit) as exit_info:
    train_main(TINY + flags + ["--out", str(tmp_path)])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_existing_run_directory_is_kept(train_main, tmp_path, capsys):
  argv = TINY + ["--algo", "local", "--out", str(tmp_path), "--name", "keep", "--rounds", "1"]
  assert train_main(argv) == 0
  before = (tmp_path / "keep" / "summary.json").read_text()
  assert train_main(argv) == 2
  assert "already exists" in capsys.readouterr().err
  assert (tmp_path / "keep" / "summary.json").read_text() == before
  assert train_main(argv + ["--overwrite"]) == 0


def test_a_failing_overwrite_keeps_the_old_run(train_main, tmp_path, capsys):
  argv = TINY + ["--algo", "local", "--out", str(tmp_path), "--name", "keep", "--rounds", "1"]
  assert train_main(argv) == 0
  before = (tmp_path / "keep" / "summary.json").read_text()
  bad = argv + ["--overwrite", "--dataset", "Nowhere-m4-h2", "--data-dir", str(tmp_path)]
  assert train_main(bad) == 2
  assert "unknown dataset 'Nowhere'" in capsys.readouterr().err
  assert (tmp_path / "keep" / "summary.json").read_text() == before


def test_overwrite_never_replaces_a_folder_that_is_not_a_run(train_main, tmp_path, capsys):
  precious = tmp_path / "notes"
  precious.mkdir()
  (precious / "thesis.txt").write_text("years of work")
  argv = TINY + ["--algo", "local", "--out", str(tmp_path), "--name", "notes", "--overwrite"]
  assert train_main(argv) == 2
  assert "not a run directory" in capsys.readouterr().err
  assert (precious / "thesis.txt").read_text() == "years of work"


def test_a_collapsed_model_is_a_diverged_run(train_main, tmp_path, capsys):
  # Under MSE, lr 1e30 blows the params up (finite but huge): predictions collapse to zero
  # vectors, which score 180 deg. That is no better than a random direction: the run stops and
  # says so. (The orthodromic loss's exact gradient makes such a step non-finite at once.)
  argv = TINY + ["--algo", "fedavg", "--learning_rate", "1e30", "--loss", "mse"]
  argv += ["--out", str(tmp_path)]
  assert train_main(argv + ["--name", "d", "--checkpoint-every", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert "round 1, seed 0: the models diverged: on the validation windows" in err
  assert "180.0 deg, is no better than a random direction's (90 deg)" in err
  assert "no checkpoint of models known good (round 0 or earlier) is kept" in err
  assert not (tmp_path / "d" / "summary.json").exists()
  assert json.loads((tmp_path / "d" / "diverged.json").read_text())["checkpoint"] == []


def test_missing_data_root_says_how_to_set_it(train_main, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("FEDVP_DATA", raising=False)
  assert train_main(["--dataset", "David-m10-h1", "--out", str(tmp_path), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "--data-dir" in err and "FEDVP_DATA" in err
  assert not any(tmp_path.iterdir())


def test_same_seed_same_run(train_main, tmp_path):
  runs = []
  for name in ("a", "b"):
    assert train_main(TINY + ["--algo", "fedavg", "--out", str(tmp_path), "--name", name]) == 0
    runs.append(read_run(tmp_path / name)[1][0])
  strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
  assert strip(runs[0]) == strip(runs[1])


def test_entry_point_runs_as_a_script(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "scripts" / "train.py"),
      *TINY,
      "--algo",
      "fedavg",
      "--rounds",
      "1",
      "--out",
      str(tmp_path),
      "--name",
      "s",
    ],
    check=False,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  assert "Average Global Loss" in result.stdout


@pytest.mark.real_data
@pytest.mark.parametrize("algo", ["partial-fedavg", "fedgen"])
def test_real_data_run(train_main, tmp_path, david_root, algo):
  argv = (
    f"--dataset David-m10-h1 --data-dir {david_root} --num_users 3 --rounds 2 --local_epochs 2 "
    f"--batch_size 16 --model lstm --no-progress --algo {algo} --out {tmp_path} --name d"
  ).split() + FEDGEN_TINY
  assert train_main(argv) == 0
  summary, (metrics,) = read_run(tmp_path / "d")
  config = json.loads((tmp_path / "d" / "config.json").read_text())
  # 10 train videos of 90 windows, 2 of them held out to validate; 5 test videos.
  assert config["train_windows"] == [720] * 3 and config["validation_windows"] == [180] * 3
  assert config["test_windows"] == [450] * 3
  assert len(metrics) == 2 and np.isfinite(summary["final_loss_mean"])


def test_front_door_command_parses_to_a_valid_run():
  """``fedvp train --algo fedgen --pretrain-epochs 200`` with its defaults (the full run takes
  minutes; it is run by hand and reported in the closing note). The config is checked as it is
  built."""
  from fedvp_jax.cli.flags import config_from, given_settings
  from fedvp_jax.cli.train import build_parser

  parser = build_parser()
  args = parser.parse_args(["--algo", "fedgen", "--pretrain-epochs", "200"])
  config = config_from(parser, given_settings(args))
  assert config.algorithm == "fedgen" and config.fedgen.pretrain_rounds == 200
  assert config.total_rounds == config.rounds + 200


def test_one_setting_under_two_spellings_is_an_error(train_main, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_main(TINY + ["--algo", "fedavg", "--algorithm", "fedgen", "--out", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "--algo and --algorithm set the same setting" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_resume_refuses_settings_other_than_data_dir_and_devices(train_main, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_main(["--resume", str(tmp_path / "r"), "--rounds", "5", "--beta", "0.5"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--rounds, --beta cannot change" in err
  assert not any(tmp_path.iterdir())
