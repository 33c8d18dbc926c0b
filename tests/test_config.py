"""The settings schema (fedvp_jax.config.SCHEMA): every setting round-trips the command line,
config.json and a sweep spec to the same RunConfig; every bad value is refused by each of them,
the command line naming the flag, a spec its file and key, the library the quantity alone;
the light modules stay light; old (0.1) run directories still read."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from fedvp_jax.cli.flags import config_from, given_settings, spellings
from fedvp_jax.cli.train import build_parser
from fedvp_jax.config import SCHEMA, RunConfig, from_record, get, to_record
from fedvp_jax.errors import ConfigError, SettingError
from fedvp_jax.sweep import expand_spec

# A valid value other than the default, for every setting.
VALID = {
  "validation_fraction": 0.3,
  "patience": 5,
  "protocol": "track",
  "augment": "none",
  "loss": "mse",
  "algorithm": "fedgen",
  "dataset": "Synthetic-m4-h2",
  "data_dir": "/tmp/fedvp-data",
  "model": "lstm",
  "latent_dim": 12,
  "rounds": 7,
  "optimizer": "adam",
  "learning_rate": 0.03,
  "num_clients": 5,
  "users": ("0", "3"),
  "split": "time",
  "num_seeds": 3,
  "seed": 4,
  "devices": 2,
  "beta": 0.5,
  "local_steps": 3,
  "batch_size": 16,
  "clients_per_round": 2,
  "eval_every": 2,
  "generator": "deep",
  "embedding": True,
  "grain": 16,
  "heatmap_sigma": 12.5,
  "gen_batch_size": 8,
  "gen_steps": 3,
  "gen_learning_rate": 1e-4,
  "server_batch_size": 32,
  "alpha": 10.0,
  "latent_weight": 0.5,
  "diversity_weight": 0.25,
  "pretrain_rounds": 50,
  "gen_warmup": 5,
  "alpha_decay": 0.9,
  "alpha_floor": 0.01,
  "noise_dim": 8,
  "generator_hidden": 64,
  "label_upload": "heatmap",
  "noise_multiplier": 1.5,
  "target_epsilon": 4.0,
  "delta": 1e-6,
  "clip_norm": 0.5,
  "heatmap_clip": 2.0,
}

# Values each setting must refuse (as Python/TOML values; the command line gets their text).
INVALID = {
  "validation_fraction": [-0.1, 0.6],
  "patience": [0],
  "protocol": ["x"],
  "augment": ["x"],
  "loss": ["x", "cosine"],
  "algorithm": ["x", "fedprox"],
  "dataset": ["x", "David-m0-h1"],
  "model": ["x"],
  "latent_dim": [6, 0],
  "rounds": [0, -1],
  "optimizer": ["x"],
  "learning_rate": [0.0, -0.1, math.inf, 1e39],
  "num_clients": [0],
  "users": [()],
  "split": ["x"],
  "num_seeds": [0],
  "seed": [-1],
  "devices": [0],
  "beta": [1.5, 0.0, -0.5],
  "local_steps": [0],
  "batch_size": [0],
  "clients_per_round": [0, 11],  # 11: more than the 10 clients
  "eval_every": [0],
  "generator": ["x"],
  "grain": [15, 2, 0],
  "heatmap_sigma": [0.0, math.inf, 1e39],
  "gen_batch_size": [0],
  "gen_steps": [0],
  "gen_learning_rate": [0.0, math.inf, 1e39],
  "server_batch_size": [0],
  "alpha": [-1.0, math.inf],
  "latent_weight": [-1.0, math.inf],
  "diversity_weight": [-1.0, math.inf],
  "pretrain_rounds": [-1],
  "gen_warmup": [-1],
  "alpha_decay": [-0.1, 1.5],
  "alpha_floor": [-1.0, math.inf],
  "noise_dim": [0],
  "generator_hidden": [0],
  "label_upload": ["x", "dp-heatmap"],  # dp-heatmap: only with DP on
  "noise_multiplier": [0.0, -1.0, math.inf, math.nan],
  "target_epsilon": [0.0, -1.0, math.inf],
  "delta": [0.0, 1.0, 1.5],
  "clip_norm": [0.0, -1.0, math.inf],
  "heatmap_clip": [0.0, math.inf],
}
# Settings whose every value of the right type is valid (a path; a switch).
ANY_VALUE = {"data_dir", "embedding"}

INVALID_CASES = [(name, value) for name, values in INVALID.items() for value in values]


def flag_text(value) -> str:
  if isinstance(value, tuple):
    return ",".join(value)
  return str(value)


def flag_args(name: str, value, flag: str | None = None) -> list[str]:
  """The command-line words that give setting ``name`` the value ``value``."""
  flag = flag or SCHEMA[name].flag
  if SCHEMA[name].kind is bool:
    return [flag] if value else ["--no-" + flag[2:]]
  return [flag, flag_text(value)]


def toml_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float) and math.isinf(value):
    return "inf" if value > 0 else "-inf"
  if isinstance(value, tuple):
    return json.dumps(list(value))
  if isinstance(value, str):
    return json.dumps(value)
  return repr(value)


def parse(argv: list[str]) -> RunConfig:
  parser = build_parser()
  return config_from(parser, given_settings(parser.parse_args(argv)))


def test_the_tables_cover_every_setting():
  assert set(VALID) == set(SCHEMA)
  assert set(INVALID) | ANY_VALUE == set(SCHEMA) and not set(INVALID) & ANY_VALUE
  for name, value in VALID.items():
    assert value != SCHEMA[name].default, name


def test_no_flags_is_the_default_config_and_the_parser_has_no_defaults():
  parser = build_parser()
  args = parser.parse_args([])
  assert given_settings(args) == {}
  assert config_from(parser, given_settings(args)) == RunConfig()
  setting_actions = [a for a in parser._actions if a.dest in SCHEMA]
  assert {a.dest for a in setting_actions} == set(SCHEMA)
  assert all(a.default is argparse.SUPPRESS for a in setting_actions)


@pytest.mark.parametrize("name", list(SCHEMA))
def test_every_setting_round_trips_flags_record_and_spec(name):
  value = VALID[name]
  expected = RunConfig.of(**{name: value})
  assert get(expected, name) == value
  assert expected != RunConfig()
  # Every spelling of its flag (kebab, snake, the researcher's aliases) gives the same config.
  for flag in spellings(SCHEMA[name]):
    assert parse(flag_args(name, value, flag)) == expected, flag
  # config.json: to_record, through JSON text, from_record.
  record = json.loads(json.dumps(to_record(expected)))
  assert from_record(record) == expected
  assert set(record) == set(SCHEMA)
  # A sweep spec's [shared] table.
  (run,) = expand_spec(f"[shared]\n{name} = {toml_value(value)}\n", "spec.toml")
  assert run.config == expected


def test_bool_settings_can_be_switched_off_again():
  on = RunConfig.of(embedding=True)
  assert parse(["--embedding"]) == on
  assert parse(["--no-embedding"]) == RunConfig()
  (run,) = expand_spec("[shared]\nembedding = false\n", "spec.toml")
  assert run.config == RunConfig()


@pytest.mark.parametrize(("name", "value"), INVALID_CASES)
def test_the_command_line_refuses_a_bad_value_naming_the_flag(name, value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    parse(flag_args(name, value))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"argument {SCHEMA[name].flag}: " in err, err


@pytest.mark.parametrize(("name", "value"), INVALID_CASES)
def test_a_spec_refuses_a_bad_value_naming_the_spec_and_key(name, value):
  with pytest.raises(ConfigError) as caught:
    expand_spec(f"[shared]\n{name} = {toml_value(value)}\n", "my-spec.toml")
  message = str(caught.value)
  assert message.startswith(f"my-spec.toml [shared]: {name} "), message


@pytest.mark.parametrize(("name", "value"), INVALID_CASES)
def test_the_library_refuses_a_bad_value_naming_the_quantity_not_a_flag(name, value):
  with pytest.raises(SettingError) as caught:
    RunConfig.of(**{name: value})
  assert caught.value.setting == name
  assert str(caught.value).startswith(f"{name} ")
  assert "--" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(set(SCHEMA) - {"data_dir", "dataset"}))
def test_a_value_of_the_wrong_type_is_refused(name):
  kind = SCHEMA[name].kind
  wrong = 2.5 if kind is not float else ("x",)
  if kind is str:
    wrong = 3
  with pytest.raises(SettingError, match=f"^{name} .*should be"):
    RunConfig.of(**{name: wrong})
  with pytest.raises(ConfigError, match=rf"^s\.toml \[shared\]: {name} "):
    expand_spec(f"[shared]\n{name} = {toml_value(wrong)}\n", "s.toml")


def test_a_spec_or_the_library_refuses_a_number_written_as_a_string():
  # Only flags are text; a TOML or Python string is not a number.
  with pytest.raises(ConfigError, match=r"^s\.toml \[shared\]: rounds '3': should be an integer"):
    expand_spec('[shared]\nrounds = "3"\n', "s.toml")
  with pytest.raises(SettingError, match=r"^beta '0\.5': should be a number"):
    RunConfig.of(beta="0.5")
  assert parse(["--rounds", "3"]) == RunConfig.of(rounds=3)


def test_unknown_and_legacy_names():
  with pytest.raises(SettingError, match=r"^roundz: no such setting \(did you mean 'rounds'"):
    RunConfig.of(roundz=3)
  with pytest.raises(ConfigError, match=r"^s\.toml \[shared\]: roundz: no such setting"):
    expand_spec("[shared]\nroundz = 3\n", "s.toml")
  legacy = RunConfig.of(algo="fedgen", times=2, num_users=4, local_epochs=3, pretrain_epochs=5)
  assert legacy == RunConfig.of(
    algorithm="fedgen", num_seeds=2, num_clients=4, local_steps=3, pretrain_rounds=5
  )
  assert RunConfig.of(hidden=64).fedgen.generator_hidden == 64
  # The researcher's algorithm names.
  assert RunConfig.of(algorithm="partialFedGen").algorithm == "partial-fedgen"


# --- the light modules stay light ---------------------------------------------------------------


def run_python(code: str) -> str:
  result = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=False,
    timeout=300,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout.strip()


def test_geometry_imports_neither_orbax_nor_matplotlib():
  out = run_python(
    "import sys, fedvp_jax.geometry\n"
    "print(sorted(m for m in ('orbax', 'orbax.checkpoint', 'matplotlib') if m in sys.modules))"
  )
  assert out == "[]"


def test_train_help_imports_no_jax():
  out = run_python(
    "import sys, fedvp_jax.cli\n"
    "try:\n"
    "  fedvp_jax.cli.main(['train', '--help'])\n"
    "except SystemExit:\n"
    "  pass\n"
    "print('jax' in sys.modules, 'numpy' in sys.modules)"
  )
  assert out.splitlines()[-1] == "False False", out
  assert "--local-steps" in out and "--num-clients" in out


# --- old run directories ------------------------------------------------------------------------

OLD_RUNS = sorted((REPO / "results" / "weekly-table").glob("*/config.json"))


def test_there_are_old_runs_to_read():
  assert len(OLD_RUNS) >= 10
  assert all("algo" in json.loads(p.read_text())["config"] for p in OLD_RUNS)  # 0.1's names


@pytest.mark.parametrize("path", OLD_RUNS, ids=lambda p: p.parent.name)
def test_an_old_config_json_reads(path: Path):
  from fedvp_jax.report import load_run
  from fedvp_jax.rundir import RunDir

  old = json.loads(path.read_text())["config"]
  config = RunDir(path.parent).read_config()
  assert config.algorithm == old["algo"]
  assert config.num_seeds == old["times"]
  assert config.num_clients == old["num_users"]
  assert config.round.local_steps == old["local_epochs"]
  assert config.round.beta == old["beta"]
  assert config.fedgen.pretrain_rounds == old["fedgen"]["pretrain_epochs"]
  assert config.fedgen.generator_hidden == old["fedgen"]["hidden"]
  assert (config.dataset, config.rounds) == (old["dataset"], old["rounds"])
  # Settings added since then read as the old runs ran, not as today's defaults.
  assert (config.round.loss, config.round.augment, config.validation_fraction) == ("mse", "none", 0)
  result = load_run(path.parent)
  assert result.config == to_record(config)
  assert result.curves.shape == (old["times"], config.total_rounds + 1)
  assert result.summary is not None


def test_a_record_without_a_later_setting_reads_as_runs_ran_before_it():
  record = to_record(RunConfig.of(loss="orthodromic", augment="yaw", validation_fraction=0.3))
  assert from_record(record).round.loss == "orthodromic"  # recorded: kept
  for name, before in [("loss", "mse"), ("augment", "none"), ("validation_fraction", 0.0)]:
    assert SCHEMA[name].unrecorded == (before,)
    assert get(from_record({k: v for k, v in record.items() if k != name}), name) == before
  # Any other setting a record lacks takes its default.
  assert from_record({k: v for k, v in record.items() if k != "batch_size"}).round.batch_size == 64
