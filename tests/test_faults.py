"""Fault injection: what a run promises (docs/guarantees.md) under full disks, damaged files,
divergence, kills and oversized settings. Every fault ends in one line on stderr and exit code
2, or in results equal to an uninterrupted run's; nothing written before it is lost."""

import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY_RUN

from fedvp_jax import runner
from fedvp_jax.cli import main as fedvp
from fedvp_jax.errors import DivergenceError
from fedvp_jax.experiment import prepare
from fedvp_jax.metrics import Summary
from fedvp_jax.rounds import diverged_models
from fedvp_jax.rundir import RunDir

TINY = (
  "--dataset Synthetic-m4-h2 --num_users 3 --rounds 3 --local_epochs 2 --batch_size 8 "
  "--model lstm --latent-dim 12 --no-progress"
).split()
TINY_CONFIG = TINY_RUN


def results(run_dir):
  """What a run computed (not how long it took)."""
  summary = json.loads((run_dir / "summary.json").read_text())
  keys = ("final_loss_mean", "orthodromic_deg_mean", "selected_rounds", "selected_loss_mean")
  return {key: summary[key] for key in keys}


def error_line(err: str) -> str:
  """The one line a fault may print on stderr (warnings aside)."""
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of TINY, with a checkpoint every round."""
  out = tmp_path_factory.mktemp("reference")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("FEDVP_CACHE", str(out / "trace-cache"))
    argv = ["train", *TINY, "--checkpoint-every", "1", "--out", str(out), "--name", "run"]
    assert fedvp(argv) == 0
  return out / "run"


# --- divergence ---


def test_models_no_better_than_a_random_direction_have_diverged():
  def summary(loss, degrees):
    return Summary(loss=jnp.asarray(loss), orthodromic_deg=jnp.asarray(degrees))

  assert diverged_models(summary(0.1, [80.0, 99.0])) is None  # mean 89.5 deg
  assert "no better than a random direction" in diverged_models(summary(0.1, [85.0, 95.0]))
  assert "180.0 deg" in diverged_models(summary(3.9, [180.0, 180.0]))
  assert diverged_models(summary(np.nan, [1.0, 2.0])) == "their loss is not finite"
  assert diverged_models(summary(0.1, [np.inf, 2.0])) == "their loss is not finite"


def blown_up_from(algorithm, first_bad_round):
  """``algorithm`` whose models are multiplied by 1e30 by round ``first_bad_round``."""

  def apply(state, data, key):
    new, metrics = algorithm.apply(state, data, key)
    bad = state.round >= first_bad_round
    scale = lambda x: jnp.where(bad, x * 1e30, x) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(scale, new), metrics

  return algorithm._replace(apply=apply)


def test_a_diverged_run_stops_and_keeps_the_checkpoint_of_models_known_good(tmp_path):
  import dataclasses

  experiment = prepare(TINY_CONFIG.replace(rounds=8))
  experiment = dataclasses.replace(experiment, algorithm=blown_up_from(experiment.algorithm, 3))
  target = RunDir(tmp_path)
  with pytest.raises(DivergenceError) as caught:
    runner.drain(runner._run_alone(experiment, target, 2, False, {}))
  message = str(caught.value)
  # Round 3's update blew the models up; round 4 evaluates them. The checkpoint of round 4
  # holds them, so the one of round 2 is the good one.
  assert message.startswith("round 4, seed 0: the models diverged: on the validation windows")
  assert f"the last good checkpoint, of round 2, is kept in {tmp_path}/checkpoints" in message
  assert json.loads((tmp_path / "diverged.json").read_text())["checkpoint"] == [2]
  records = [json.loads(line) for line in (tmp_path / "seed0" / "metrics.jsonl").open()]
  assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
  assert not (tmp_path / "summary.json").exists()
  # Resumed, it restores the newest checkpoint (round 4's, the blown-up models), which this
  # attempt never saw pass a check: no checkpoint is called good.
  with pytest.raises(DivergenceError) as again:
    runner.drain(runner._run_alone(experiment, target, 2, False, {}))
  assert str(again.value).startswith("round 4, seed 0: the models diverged")
  assert "no checkpoint of models known good is kept" in str(again.value)


def test_final_models_are_checked_though_no_round_evaluated_them(tmp_path):
  # Under MSE a step this large collapses the models (zero vectors, 180 deg) with finite
  # updates, so no round excludes every client and only the final check can catch it.
  config = TINY_CONFIG.replace(rounds=2, eval_every=100, learning_rate=1e30, loss="mse")
  with pytest.raises(DivergenceError) as caught:
    runner.run(config, tmp_path / "r")
  assert str(caught.value).startswith("after round 1, seed 0: the models diverged")
  assert "no checkpoint was written (checkpoints were off)" in str(caught.value)
  assert (tmp_path / "r" / "diverged.json").is_file()
  assert not (tmp_path / "r" / "summary.json").exists()


def test_a_run_drowned_by_dp_noise_names_the_noise(tmp_path):
  # Noise this large makes the models' outputs overflow: a non-finite loss, far from the 90 deg
  # boundary that a merely noise-drowned model sits on.
  config = TINY_CONFIG.replace(algorithm="fedavg", rounds=2, noise_multiplier=1e30, clip_norm=1.0)
  with pytest.raises(DivergenceError, match="or the DP noise too strong for 3 clients a round"):
    runner.run(config, tmp_path / "r")


# --- full disks ---


WRITE_SITES = 7  # .lock.owner, baselines, config, metrics restart and append, 2 summaries


@pytest.mark.parametrize("failing_write", range(1, WRITE_SITES + 1))
def test_a_full_disk_at_any_write_is_one_line_and_recoverable(
  failing_write, reference, tmp_path, monkeypatch, capsys
):
  run_dir = tmp_path / "run"
  opened = []
  real_open = pathlib.Path.open

  def open_on_a_full_disk(path, mode="r", *args, **kwargs):
    file = real_open(path, mode, *args, **kwargs)
    if run_dir in path.parents and ("w" in mode or "a" in mode):
      opened.append(path.name)
      if len(opened) == failing_write:  # the file opens; writing to it fails

        def write(*_):
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        file.write = write
    return file

  monkeypatch.setattr(pathlib.Path, "open", open_on_a_full_disk)
  argv = ["train", *TINY, "--out", str(tmp_path), "--name", "run"]
  assert fedvp(argv) == 2
  line = error_line(capsys.readouterr().err)
  assert line.startswith("error: No space left on device:") and opened[-1] in line
  assert not list(tmp_path.rglob("*.tmp")), "a failed atomic write left its temporary file"
  monkeypatch.setattr(pathlib.Path, "open", real_open)
  if RunDir(run_dir).exists():
    assert fedvp(["train", "--resume", str(run_dir), "--no-progress"]) == 0
  else:  # failed before it was a run directory: nothing is left in the way of a new run
    assert not run_dir.exists()
    assert fedvp(argv) == 0
  assert results(run_dir) == results(reference)


class FullDiskCheckpoints:
  """An orbax manager stand-in that fails as orbax does on a full disk: the save starts a
  temporary folder, and waiting for it raises tensorstore's RESOURCE_EXHAUSTED ValueError."""

  def __init__(self, directory, error):
    self.directory, self.error = directory, error

  def save(self, step, args):
    (self.directory / f"{step}.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)

  def wait_until_finished(self):
    raise self.error


def test_a_checkpoint_on_a_full_disk_is_one_oserror_and_leaves_no_partial(tmp_path):
  full = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database: Failed')
  manager = FullDiskCheckpoints(tmp_path / "checkpoints", full)
  with pytest.raises(OSError) as caught:
    RunDir(tmp_path).save_checkpoint(manager, 3, {})
  assert caught.value.errno == errno.ENOSPC
  assert "checkpoint of round 3 (no space left on device)" in str(caught.value)
  assert not list(manager.directory.iterdir())
  # Any other failure inside orbax is a bug to see, not a disk error to paper over.
  with pytest.raises(ValueError, match="unrelated"):
    RunDir(tmp_path).save_checkpoint(
      FullDiskCheckpoints(manager.directory, ValueError("unrelated")), 4, {}
    )


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_an_output_folder_that_is_a_file_is_one_line(command, tmp_path, capsys):
  (tmp_path / "a-file").write_text("not a folder")
  spec = tmp_path / "spec.toml"
  spec.write_text('[[run]]\nname = "a"\nalgorithm = "fedavg"\nrounds = 1\n')
  target = ["--out", str(tmp_path / "a-file")]
  argv = ["train", *TINY, *target] if command == "train" else ["sweep", str(spec), *target]
  assert fedvp(argv) == 2
  assert "a-file" in error_line(capsys.readouterr().err)
  assert (tmp_path / "a-file").read_text() == "not a folder"


def mount_tmpfs(folder, size):
  folder.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
    capture_output=True,
    text=True,
    check=False,
  )
  if mounted.returncode != 0:
    pytest.skip(
      f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the injected "
      "full-disk test above still runs"
    )


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumable(reference, tmp_path, capsys):
  small = tmp_path / "small"
  mount_tmpfs(small, "200k")  # room for the logs, not for a checkpoint
  try:
    argv = ["train", *TINY, "--checkpoint-every", "1", "--out", str(small), "--name", "run"]
    assert fedvp(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert "cannot write the checkpoint of round 1 (no space left on device)" in line
    assert not list((small / "run" / "checkpoints").iterdir()), "a partial checkpoint was kept"
    shutil.copytree(small / "run", tmp_path / "run")
  finally:
    subprocess.run(["umount", "-l", str(small)], check=False)
  assert fedvp(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
  assert results(tmp_path / "run") == results(reference)


# --- damaged run directories ---

# What resume and report do when one file of a finished run is cut in half: refuse in one line
# naming the file, or carry on where the file is not needed (saying so when a log has gaps).
TRUNCATED = {
  "config.json": ("refuse", "refuse"),
  "baselines.json": ("refuse", "refuse"),
  "summary.json": ("rewrite", "refuse"),
  "seed0/summary.json": ("refuse", "ok"),
  "seed0/metrics.jsonl": ("gaps", "gaps"),
  "checkpoints/3/_CHECKPOINT_METADATA": ("ok", "ok"),
}


@pytest.mark.parametrize("name", TRUNCATED)
def test_a_truncated_file_is_named_or_not_needed(name, reference, tmp_path, capsys):
  run_dir = tmp_path / "run"
  shutil.copytree(reference, run_dir)
  damaged = run_dir / name
  damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
  on_resume, on_report = TRUNCATED[name]
  calls = {
    "report": (["report", str(run_dir), "--out", str(tmp_path / "report")], on_report),
    "resume": (["train", "--resume", str(run_dir), "--no-progress"], on_resume),
  }
  for command, (argv, expected) in calls.items():
    code = fedvp(argv)
    captured = capsys.readouterr()
    if expected == "refuse":
      assert code == 2, command
      assert str(damaged) in error_line(captured.err), command
      continue
    assert code == 0, (command, captured.err)
    assert ("lacks 2 of its 3 rounds (1, 2)" in captured.out) == (expected == "gaps"), command
    if command == "resume":  # a whole summary.json again, with the same numbers
      assert results(run_dir) == results(reference)


# --- oversized settings ---


def test_a_batch_far_larger_than_any_clients_windows_is_warned_about():
  with pytest.warns(UserWarning, match=r"batch_size 100000 is \d+x the most training windows"):
    prepare(TINY_CONFIG.replace(batch_size=100_000))


# --- kills ---


def test_a_sweep_killed_at_a_random_moment_finishes_with_the_same_table(tmp_path):
  spec = tmp_path / "spec.toml"
  spec.write_text(
    "[shared]\n"
    'dataset = "Synthetic-m4-h2"\nmodel = "lstm"\nnum_clients = 3\nrounds = 4\n'
    "local_steps = 2\nbatch_size = 8\nlatent_dim = 12\n\n"
    '[[run]]\nname = "avg"\nalgorithm = "fedavg"\n\n'
    '[[run]]\nname = "local"\nalgorithm = "local"\n'
  )
  command = [sys.executable, "-m", "fedvp_jax", "sweep", str(spec), "--checkpoint-every", "1"]
  sweep = lambda out: subprocess.run(
    [*command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, check=False
  )
  whole = sweep(tmp_path / "whole")
  assert whole.returncode == 0, whole.stderr
  # A random moment of the training: once a random run has logged a random number of rounds.
  rng = random.Random(14)
  name, rounds = rng.choice(["avg", "local"]), rng.randint(1, 3)  # of 4: never the very end
  log = tmp_path / "killed" / name / "seed0" / "metrics.jsonl"
  killed = subprocess.Popen(
    [*command, "--out", str(tmp_path / "killed")],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  while killed.poll() is None and not (log.is_file() and log.read_text().count("\n") >= rounds):
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  _, err = killed.communicate()
  assert killed.returncode == -signal.SIGKILL, f"the sweep ended before the kill: {err}"
  again = sweep(tmp_path / "killed")
  assert again.returncode == 0, again.stderr
  for name in ("avg", "local"):
    assert results(tmp_path / "killed" / name) == results(tmp_path / "whole" / name)
