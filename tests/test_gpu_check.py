"""benchmarks/gpu_check.sh runs end to end on the CPU with tiny workloads (its --cpu path).

This machine's part of the check: the GPU sections run the same run.py code with other sizes.

Without torch (CI installs only ``.[dev]``) the PyTorch rows are left out and every fedvp_jax
section must still produce its table.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_path_writes_every_table(tmp_path):
  env = {**os.environ, "PYTHON": sys.executable}
  done = subprocess.run(
    ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--cpu"],
    capture_output=True,
    text=True,
    env=env,
    timeout=900,
    check=False,
  )
  log = (tmp_path / "check.log").read_text() if (tmp_path / "check.log").exists() else ""
  assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
  tables = {p.stem: p.read_text() for p in tmp_path.glob("*.md")}
  assert set(tables) == {"rounds", "heatmaps", "scale", "end-to-end"}
  rounds = tables["rounds"]
  assert "| fedgen | lstm | fedvp_jax |" in rounds
  has_torch = importlib.util.find_spec("torch") is not None
  assert ("PyTorch, torch.func.vmap" in rounds) == has_torch
  assert "| fedvp_jax (jitted scatter + blur) |" in tables["heatmaps"]
  assert tables["scale"].splitlines()[-1].startswith("| 2 | ")
  assert "2 rounds with evaluation every round" in tables["end-to-end"]
