"""A run killed with SIGKILL and resumed ends with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

FLAGS = (
  "--algo fedgen --dataset Synthetic-m4-h2 --num_users 3 --rounds 8 --pretrain-epochs 2 "
  "--local_epochs 2 --batch_size 8 --model lstm --latent-dim 12 --grain 16 --heatmap-sigma 30 "
  "--gen_batch_size 8 --gen-steps 2 --no-progress --checkpoint-every 2"
).split()


DP_FLAGS = (
  "--label-upload dp-heatmap --noise-multiplier 0.5 --clip-norm 0.05 --heatmap-clip 1 "
  "--clients-per-round 2"
).split()


def train_script(*args, **kwargs):
  return subprocess.Popen(
    [sys.executable, str(REPO / "scripts" / "train.py"), *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def final_metrics(run_dir):
  summary = json.loads((run_dir / "summary.json").read_text())
  lines = (run_dir / "seed0" / "metrics.jsonl").read_text().splitlines()
  records = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
  return summary["seeds"][0]["final"], records


@pytest.mark.parametrize("extra", [[], DP_FLAGS], ids=["plain", "dp"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, extra):
  whole = train_script(*FLAGS, *extra, "--out", str(tmp_path), "--name", "whole")
  killed = train_script(*FLAGS, *extra, "--out", str(tmp_path), "--name", "killed")
  checkpoints = tmp_path / "killed" / "checkpoints"
  deadline = time.monotonic() + 300
  while not (
    checkpoints.is_dir()
    and any(p.name.isdigit() and int(p.name) >= 4 for p in checkpoints.iterdir())
  ):
    assert killed.poll() is None, killed.communicate()
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.05)
  os.kill(killed.pid, signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "killed" / "summary.json").exists()

  resumed = train_script("--resume", str(tmp_path / "killed"))
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert "resuming from the checkpoint at round" in out
  out, err = whole.communicate(timeout=300)
  assert whole.returncode == 0, err

  final_whole, records_whole = final_metrics(tmp_path / "whole")
  final_resumed, records_resumed = final_metrics(tmp_path / "killed")
  for field in ("loss", "orthodromic_deg"):
    assert final_resumed[field] == pytest.approx(final_whole[field], rel=1e-6)
  assert records_resumed == records_whole
  assert [r["round"] for r in records_resumed] == list(range(10))
  # A DP run's privacy record (sigma, C, sampling, the epsilon of all its rounds) is the same.
  privacy = [
    json.loads((tmp_path / n / "summary.json").read_text()).get("privacy")
    for n in ("whole", "killed")
  ]
  assert privacy[0] == privacy[1] and (privacy[0] is not None) == bool(extra)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
  run = train_script(*FLAGS, "--out", str(tmp_path), "--name", "r")
  _, err = run.communicate(timeout=300)
  assert run.returncode == 0, err
  before, _ = final_metrics(tmp_path / "r")
  (tmp_path / "r" / "seed0" / "summary.json").unlink()  # as if killed after the last checkpoint
  (tmp_path / "r" / "summary.json").unlink()
  newest = max(
    (p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()),
    key=lambda p: int(p.name),
  )
  for f in newest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  resumed = train_script("--resume", str(tmp_path / "r"))
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert f"checkpoint at round {newest.name} is unreadable" in out
  # The unreadable one is set aside, and the resumed run writes that round's checkpoint anew.
  assert (newest.parent / f"unreadable-{newest.name}").is_dir()
  assert (newest.parent / newest.name).is_dir()
  after, _ = final_metrics(tmp_path / "r")
  for field in ("loss", "orthodromic_deg"):
    assert after[field] == pytest.approx(before[field], rel=1e-6)
