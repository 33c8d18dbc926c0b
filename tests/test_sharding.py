"""Clients sharded over 8 fake CPU devices give the single-device result."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# Runs in a fresh interpreter: the fake-device flag must be set before JAX starts.
SCRIPT = r"""
import dataclasses, json
import jax, numpy as np
from fedvp_jax.algorithms import FedGenConfig
from fedvp_jax.training import RunConfig, prepare, run_rounds

assert len(jax.devices()) == 8, jax.devices()
report = {}
for algo in ("fedavg", "fedgen"):
  config = RunConfig(
    algo=algo, dataset="Synthetic-m4-h2", model="lstm", num_users=8, local_epochs=2, batch_size=8,
    latent_dim=12, fedgen=FedGenConfig(grain=16, heatmap_sigma=30.0, gen_batch_size=8, gen_steps=2),
  )
  states = {}
  for devices in (None, 8):
    experiment = prepare(dataclasses.replace(config, devices=devices))
    state = run_rounds(experiment.algorithm, experiment.data, 0, 3, experiment.mesh)
    states[devices] = jax.tree.map(np.asarray, state)
    if devices:
      leaf = jax.tree.leaves(experiment.data)[0]
      report[algo + "_data_devices"] = len(leaf.sharding.device_set)
  relative = lambda a, b: float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3)))
  diffs = jax.tree.map(relative, states[None], states[8])
  report[algo + "_max_rel_diff"] = max(jax.tree.leaves(diffs))
print("REPORT " + json.dumps(report))
"""


@pytest.mark.parametrize("devices", [8])
def test_sharded_rounds_equal_single_device_rounds(tmp_path, devices):
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
  }
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=REPO,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
  report = json.loads(line.removeprefix("REPORT "))
  for algo in ("fedavg", "fedgen"):
    assert report[algo + "_data_devices"] == devices
    assert report[algo + "_max_rel_diff"] < 1e-4, report
