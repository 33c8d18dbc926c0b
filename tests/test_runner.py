"""The runner: progress events, the TensorBoard log, and the run directory's files."""

import json
import struct

import pytest

from fedvp_jax.config import RunConfig
from fedvp_jax.errors import ConfigError
from fedvp_jax.rundir import RunDir, read_json, write_json
from fedvp_jax.runner import Progress, resume, resume_steps, run, run_steps

TINY = RunConfig.of(
  dataset="Synthetic-m4-h2",
  num_clients=3,
  rounds=3,
  local_steps=2,
  batch_size=8,
  model="lstm",
  latent_dim=12,
  num_seeds=2,
)


def event_scalars(folder):
  """``{tag: [(step, value), ...]}`` of the TensorBoard event files in ``folder``, read as
  TFRecords of ``Event`` protos (tensorboardX ships the proto classes)."""
  from tensorboardX.proto.event_pb2 import Event

  scalars = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      record = data[offset + 12 : offset + 12 + length]  # skip the length's CRC
      offset += 12 + length + 4  # and the record's CRC
      event = Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_progress_says_compiling_first_then_counts_every_round(tmp_path):
  steps = run_steps(TINY, tmp_path / "r")
  events = []
  while True:
    try:
      events.append(next(steps))
    except StopIteration as stop:
      summary = stop.value
      break
  assert all(isinstance(e, Progress) for e in events)
  assert events[0].compiling and events[0].done == 0
  assert [e.done for e in events[1:]] == [1, 2, 3]
  assert not any(e.compiling for e in events[1:])
  assert {e.total for e in events} == {3} and events[-1].label == "seeds 0-1"
  records = [RunDir(tmp_path / "r").read_metrics(seed) for seed in (0, 1)]
  mean_last = sum(r[-1]["train_loss"] for r in records) / 2
  assert events[-1].train_loss == pytest.approx(mean_last)
  assert summary == read_json(tmp_path / "r" / "summary.json")


def test_tensorboard_log_holds_every_rounds_numbers(tmp_path):
  pytest.importorskip("tensorboardX")
  for _ in run_steps(TINY, tmp_path / "r", tensorboard=True):
    pass
  target = RunDir(tmp_path / "r")
  for seed in (0, 1):
    scalars = event_scalars(tmp_path / "r" / "tensorboard" / f"seed{seed}")
    records = target.read_metrics(seed)
    assert [step for step, _ in scalars["train_loss"]] == [0, 1, 2]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx(
      [r["train_loss"] for r in records], rel=1e-6
    )
    assert [v for _, v in scalars["test_orthodromic_deg/step2"]] == pytest.approx(
      [r["test_orthodromic_deg"][1] for r in records], rel=1e-6
    )


def test_json_files_are_replaced_whole(tmp_path):
  path = tmp_path / "x.json"
  write_json(path, {"a": 1})
  write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_a_truncated_summary_is_a_clear_error(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text('{"seeds": [')
  with pytest.raises(ConfigError, match=r"summary.json is unreadable"):
    read_json(path)


def test_a_resume_over_a_damaged_metrics_log_starts_over(tmp_path, caplog):
  config = TINY.replace(num_seeds=1, rounds=4)
  whole = run(config, tmp_path / "whole")
  run(config, tmp_path / "r", checkpoint_every=2)
  target = RunDir(tmp_path / "r")
  for path in (tmp_path / "r" / "summary.json", target.seed_dir(0) / "summary.json"):
    path.unlink()  # as if killed after the last checkpoint
  lines = target.metrics_path(0).read_text().splitlines()
  target.metrics_path(0).write_text("\n".join(lines[1:]) + "\n")  # round 0's record lost
  with caplog.at_level("INFO", logger="fedvp_jax"):
    resumed = resume(tmp_path / "r")
  assert "lacks records before the checkpoint (seed 0: rounds [0])" in caplog.text
  assert [r["round"] for r in target.read_metrics(0)] == [0, 1, 2, 3]
  assert resumed["seeds"][0]["best_round"] == whole["seeds"][0]["best_round"]
  assert resumed["seeds"][0]["best_loss"] == pytest.approx(whole["seeds"][0]["best_loss"])


def test_two_processes_never_write_one_run_directory(tmp_path):
  config = TINY.replace(num_seeds=1, rounds=4)
  run(config, tmp_path / "r", checkpoint_every=2)
  for path in (tmp_path / "r" / "summary.json", tmp_path / "r" / "seed0" / "summary.json"):
    path.unlink()  # as if killed after the last checkpoint
  first = resume_steps(tmp_path / "r")
  next(first)  # holds the run directory now
  with pytest.raises(ConfigError, match=rf"{tmp_path / 'r'} is being written by process \d+"):
    next(resume_steps(tmp_path / "r"))
  with pytest.raises(ConfigError, match="is being written by"):
    next(run_steps(config, tmp_path / "r", overwrite=True))
  for _ in first:
    pass
  assert RunDir(tmp_path / "r").is_finished()
  next(resume_steps(tmp_path / "r"), None)  # released: the next writer gets it
