"""Clients sharded over 8 fake CPU devices give the single-device result."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# Runs in a fresh interpreter: the fake-device flag must be set before JAX starts.
SCRIPT = r"""
import json
import jax, numpy as np
from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare
from fedvp_jax.rounds import run_rounds

assert len(jax.devices()) == 8, jax.devices()
report = {}
for algo in ("fedavg", "fedgen"):
  config = RunConfig.of(
    algorithm=algo, dataset="Synthetic-m4-h2", model="lstm", num_clients=8, local_steps=2,
    batch_size=8, latent_dim=12, grain=16, heatmap_sigma=30.0, gen_batch_size=8, gen_steps=2,
  )
  states = {}
  for devices in (None, 8):
    experiment = prepare(config.replace(devices=devices))
    state = run_rounds(experiment.algorithm, experiment.data, 0, 3, experiment.mesh)
    states[devices] = jax.tree.map(np.asarray, state)
    if devices:
      leaf = jax.tree.leaves(experiment.data)[0]
      report[algo + "_data_devices"] = len(leaf.sharding.device_set)
  relative = lambda a, b: float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3)))
  diffs = jax.tree.map(relative, states[None], states[8])
  report[algo + "_max_rel_diff"] = max(jax.tree.leaves(diffs))
  # 6 clients, 4 of them a round, over 4 devices: padded to 8 rows that never train.
  padded = config.replace(num_clients=6, clients_per_round=4)
  states = {}
  for devices in (None, 4):
    experiment = prepare(padded.replace(devices=devices))
    states[devices] = run_rounds(experiment.algorithm, experiment.data, 0, 3, experiment.mesh)
    report[f"{algo}_rows_{devices}"] = experiment.data.num_rows
  first_six = lambda state: jax.tree.map(
    lambda x: np.asarray(x)[:6] if np.ndim(x) and np.shape(x)[0] in (6, 8) else np.asarray(x),
    state,
  )
  diffs = jax.tree.map(relative, first_six(states[None]), first_six(states[4]))
  report[algo + "_padded_max_rel_diff"] = max(jax.tree.leaves(diffs))
print("REPORT " + json.dumps(report))
"""


def report_on_fake_devices(devices: int, script: str, *args: str):
  """Runs ``script`` in a fresh interpreter with ``devices`` fake CPU devices and returns the
  JSON it prints after ``REPORT``."""
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
  }
  result = subprocess.run(
    [sys.executable, "-c", script, *args],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=REPO,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
  return json.loads(line.removeprefix("REPORT "))


@pytest.mark.parametrize("devices", [8])
def test_sharded_rounds_equal_single_device_rounds(tmp_path, devices):
  report = report_on_fake_devices(devices, SCRIPT)
  for algo in ("fedavg", "fedgen"):
    assert report[algo + "_data_devices"] == devices
    assert report[algo + "_max_rel_diff"] < 1e-4, report
    assert (report[f"{algo}_rows_None"], report[f"{algo}_rows_4"]) == (6, 8)
    assert report[algo + "_padded_max_rel_diff"] < 1e-4, report


# A run is checkpointed on one placement, "interrupted" (its newest checkpoint and summaries
# removed), and resumed on another; in a fresh interpreter for the fake devices.
RESTORE_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import jax
from fedvp_jax import runner
from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare
from fedvp_jax.rundir import RunDir
from fedvp_jax.runner import resume, run

reports = []
# (devices that write, devices that read): one interpreter for both directions, so the
# programs they share compile once.
for written, read in ((4, 1), (None, 4)):
  config = RunConfig.of(
    algorithm="fedgen", dataset="Synthetic-m4-h2", model="lstm", num_clients=4, rounds=4,
    local_steps=2, batch_size=8, latent_dim=12, num_seeds=2, devices=written, grain=16,
    heatmap_sigma=30.0, gen_batch_size=8, gen_steps=2,
  )
  run_dir = Path(sys.argv[1]) / f"written{written}"
  whole = run(config, run_dir, checkpoint_every=2)
  shutil.rmtree(run_dir / "checkpoints" / "4")
  for summary in run_dir.rglob("summary.json"):
    summary.unlink()
  experiment = prepare(config.replace(devices=read))
  target = RunDir(run_dir)
  step, state = runner._restore_newest(target, target.checkpoints(), experiment, [0, 1])
  placements = {
    len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state.clients.client_params)
  }
  resumed = resume(run_dir, devices=read)
  reports.append({
    "read": read, "step": step, "placements": sorted(placements),
    "whole": [s["final"] for s in whole["seeds"]],
    "resumed": [s["final"] for s in resumed["seeds"]],
  })
print("REPORT " + json.dumps(reports))
"""


def test_a_checkpoint_restores_on_another_number_of_devices(tmp_path):
  reports = report_on_fake_devices(8, RESTORE_SCRIPT, str(tmp_path))
  assert [r["read"] for r in reports] == [1, 4]
  for report in reports:  # 4 devices -> 1, then 1 (no mesh) -> 4
    assert report["step"] == 2
    assert report["placements"] == [report["read"]]
    for whole, resumed in zip(report["whole"], report["resumed"], strict=True):
      assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-4)
      assert resumed["orthodromic_deg"] == pytest.approx(whole["orthodromic_deg"], rel=1e-4)
