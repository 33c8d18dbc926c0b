"""One run over several processes (jax.distributed on 127.0.0.1, gloo collectives on CPU):
the same metrics as one process, each process reading only its own clients' traces, one
writer, a refused mismatch, and a killed process named by the survivor and resumed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_dataset

PROCESSES, DEVICES_EACH = 2, 2

# Settings of every run here: 6 clients over 4 devices (so padded to 8 rows) and, of the 9
# viewers, 3 new ones (padded to 4 rows); no split files.
SETTINGS = {
  "dataset": "Tiny-m4-h2",
  "model": "lstm",
  "num_clients": 6,
  "local_steps": 2,
  "batch_size": 8,
  "latent_dim": 12,
  "grain": 16,
  "heatmap_sigma": 30.0,
  "gen_batch_size": 8,
  "gen_steps": 2,
}
RUNS = {
  "fedavg": {"algorithm": "fedavg", "clients_per_round": 4, "rounds": 4},
  "fedgen": {"algorithm": "fedgen", "rounds": 2, "pretrain_rounds": 2},
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(devices: int) -> dict[str, str]:
  return {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
  }


def job_flags(port: int, process: int) -> list[str]:
  """The flags docs/multihost.md gives for one process of a job on one machine."""
  return [
    "--coordinator",
    f"127.0.0.1:{port}",
    "--num-processes",
    str(PROCESSES),
    "--process-id",
    str(process),
  ]


def run_alone(argv: list[str], devices: int = DEVICES_EACH, timeout: float = 600):
  """``python argv...`` as one process with ``devices`` CPU devices, to its end."""
  return subprocess.run(
    [sys.executable, *argv],
    cwd=REPO,
    env=environment(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def start_job(argv: list[str], cwd: Path) -> list[subprocess.Popen]:
  """Starts every process of a job running ``python argv... <job flags>``."""
  port = free_port()
  return [
    subprocess.Popen(
      [sys.executable, *argv, *job_flags(port, p)],
      cwd=cwd,
      env=environment(DEVICES_EACH),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in range(PROCESSES)
  ]


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
  outcomes = []
  for process in processes:
    try:
      out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      raise
    outcomes.append((process.returncode, out, err))
  return outcomes


# Runs every configuration of RUNS with the library (runner.run) and reports each run's summary
# and the viewers whose traces this process read. argv: data root, output folder, then the
# job's flags (none for one process; then RunConfig.devices is argv[3], or "None").
SCRIPT = r"""
import json, sys
from pathlib import Path
from fedvp_jax import distributed, experiment
from fedvp_jax.config import RunConfig
from fedvp_jax.runner import run

root, out = sys.argv[1], Path(sys.argv[2])
settings, runs = json.loads(sys.argv[3]), json.loads(sys.argv[4])
if len(sys.argv) > 6:
  distributed.start(sys.argv[7], int(sys.argv[9]), int(sys.argv[11]))
devices = None if sys.argv[5] == "None" else int(sys.argv[5])

read = []
load_traces = experiment.load_traces
def recording(*args, **kwargs):
  traces = load_traces(*args, **kwargs)
  read.append(sorted({user for _, user in traces.traces}))
  return traces
experiment.load_traces = recording

report = {}
for name, run_settings in runs.items():
  read.clear()
  config = RunConfig.of(**settings, **run_settings, data_dir=root, devices=devices)
  summary = run(config, out / name)
  report[name] = {"summary": summary, "read": [users for users in read if users]}
distributed.finish()
print("REPORT " + json.dumps(report))
"""


def report_of(stdout: str) -> dict:
  line = next(line for line in stdout.splitlines() if line.startswith("REPORT "))
  return json.loads(line.removeprefix("REPORT "))


def numbers(summary: dict) -> np.ndarray:
  """The run's metrics that must not depend on how the clients were placed."""
  keys = ("final_loss_mean", "selected_loss_mean", "orthodromic_deg_mean")
  values = [summary[k] for k in keys]
  if "new_viewers" in summary:  # where the server's model is what clients deploy
    values.append(summary["new_viewers"]["selected_orthodromic_deg_mean"])
  return np.hstack([np.ravel(v) for v in values]).astype(float)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("data")
  write_dataset(root, videos=3, users=9, length=40)
  return root


def test_two_processes_give_one_process_metrics_and_read_only_their_traces(data_root, tmp_path):
  args = [json.dumps(SETTINGS), json.dumps(RUNS)]
  single = {}
  for devices in ("None", "4"):
    result = run_alone(
      ["-c", SCRIPT, str(data_root), str(tmp_path / f"one-{devices}"), *args, devices], 4
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single[devices] = report_of(result.stdout)
  job = start_job(["-c", SCRIPT, str(data_root), str(tmp_path / "two"), *args, "None"], cwd=REPO)
  outcomes = finish(job)
  for code, _, err in outcomes:
    assert code == 0, err[-3000:]
  reports = [report_of(out) for _, out, _ in outcomes]

  for name in RUNS:
    two = reports[0][name]["summary"]
    for devices in ("None", "4"):
      np.testing.assert_allclose(
        numbers(two), numbers(single[devices][name]["summary"]), rtol=1e-4, err_msg=name
      )
    # Process 1 wrote nothing; process 0 wrote the run directory, readable as any run's.
    written = json.loads((tmp_path / "two" / name / "summary.json").read_text())
    assert written["final_loss_mean"] == two["final_loss_mean"]
    record = json.loads((tmp_path / "two" / name / "config.json").read_text())
    clients, new = record["users"], record["new_viewers"]
    assert len(clients) == 6 and len(new) == 3
    # Rows 0-3 of the 8 client rows and 0-1 of the 4 new-viewer rows are process 0's.
    expected = [sorted(clients[:4] + new[:2]), sorted(clients[4:] + new[2:])]
    for process, report in enumerate(reports):
      assert report[name]["read"] == [expected[process]], (name, process)


def train_command(out: Path, data_root: Path, *extra: str) -> list[str]:
  return [
    "-m",
    "fedvp_jax",
    "train",
    "--dataset",
    "Tiny-m4-h2",
    "--data-dir",
    str(data_root),
    "--model",
    "lstm",
    "--num-clients",
    "6",
    "--local-steps",
    "2",
    "--batch-size",
    "8",
    "--out",
    str(out),
    "--name",
    "run",
    "--no-progress",
    *extra,
  ]


def test_different_configurations_are_refused_before_any_round(data_root, tmp_path):
  port = free_port()
  job = [
    subprocess.Popen(
      [
        sys.executable,
        *train_command(tmp_path, data_root, "--rounds", "3", "--learning-rate", rate),
        *job_flags(port, p),
      ],
      cwd=REPO,
      env=environment(DEVICES_EACH),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p, rate in enumerate(("0.01", "0.02"))
  ]
  for code, _, err in finish(job):
    assert code == 2, err[-2000:]
    assert "process(es) 1 of 2 run a different configuration than process 0" in err
    assert "Traceback" not in err
  assert not (tmp_path / "run").exists()


def test_an_unreachable_coordinator_is_one_line(tmp_path):
  script = (
    "from fedvp_jax import distributed\n"
    f"distributed.start('127.0.0.1:{free_port()}', 2, 1, timeout=2)\n"
  )
  result = run_alone(["-c", script], devices=1, timeout=120)
  assert result.returncode != 0
  assert "could not join the job of 2 processes within 2 s" in result.stderr


def test_a_killed_process_stops_the_job_and_the_run_resumes_on_one_or_two(data_root, tmp_path):
  total = 60  # process 1 is killed after 6 logged rounds, long before the end
  rounds = ["--rounds", str(total), "--clients-per-round", "4", "--checkpoint-every", "2"]
  job = start_job(train_command(tmp_path / "job", data_root, *rounds), cwd=REPO)
  log = tmp_path / "job" / "run" / "seed0" / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (log.is_file() and len(log.read_text().splitlines()) >= 6):
    assert time.monotonic() < deadline and job[0].poll() is None, job[0].stderr.read()[-2000:]
    time.sleep(0.05)
  job[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  (code, _, err), _ = finish(job, timeout=120)
  assert time.monotonic() - killed < 60
  assert code == 2, err[-2000:]
  assert "error: process 1 of 2 stopped" in err
  assert "Traceback" not in err
  run_dir = tmp_path / "job" / "run"
  assert not (run_dir / "summary.json").exists()
  assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())

  whole = run_alone(train_command(tmp_path / "whole", data_root, *rounds))
  assert whole.returncode == 0, whole.stderr[-2000:]
  expected = json.loads((tmp_path / "whole" / "run" / "summary.json").read_text())

  # The other way round: the uninterrupted run's checkpoint (one process, one device, 6 rows)
  # continued by two processes (8 rows).
  later = tmp_path / "later"
  shutil.copytree(tmp_path / "whole" / "run", later)
  for summary in later.rglob("summary.json"):
    summary.unlink()
  shutil.rmtree(later / "checkpoints" / str(total))

  shutil.copytree(run_dir, tmp_path / "copy")
  resume = ["-m", "fedvp_jax", "train", "--no-progress", "--resume"]
  alone = run_alone([*resume, str(run_dir)])
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert "resuming from the checkpoint at round" in alone.stdout
  for resumed in (tmp_path / "copy", later):
    for code, _, err in finish(start_job([*resume, str(resumed)], cwd=REPO)):
      assert code == 0, err[-2000:]
  for resumed in (run_dir, tmp_path / "copy", later):
    summary = json.loads((resumed / "summary.json").read_text())
    np.testing.assert_allclose(numbers(summary), numbers(expected), rtol=1e-4)


SPEC = """
[shared]
dataset = "Tiny-m4-h2"
model = "lstm"
num_clients = 6
rounds = 3
local_steps = 2
batch_size = 8

[[run]]
name = "avg"
algorithm = "fedavg"

[[run]]
name = "partial"
algorithm = "partial-fedavg"
beta = 0.5
"""


def test_a_sweep_runs_over_two_processes_as_over_one(data_root, tmp_path):
  spec = tmp_path / "spec.toml"
  spec.write_text(SPEC)
  sweep = ["-m", "fedvp_jax", "sweep", str(spec), "--data-dir", str(data_root), "--no-progress"]
  one = run_alone([*sweep, "--out", str(tmp_path / "one")])
  assert one.returncode == 0, one.stderr[-2000:]
  for code, _, err in finish(start_job([*sweep, "--out", str(tmp_path / "two")], cwd=REPO)):
    assert code == 0, err[-2000:]
  for name in ("avg", "partial"):
    summaries = [
      json.loads((tmp_path / f / name / "summary.json").read_text()) for f in ("one", "two")
    ]
    np.testing.assert_allclose(numbers(summaries[1]), numbers(summaries[0]), rtol=1e-4)
  assert (tmp_path / "two" / "results.md").is_file()


def test_under_slurm_the_job_comes_from_the_environment(data_root, tmp_path):
  """`srun` sets these variables; JAX derives the coordinator (first node, a port from the job
  id), the number of processes and each one's id from them, so the command takes no job flag."""
  port = free_port_in(range(65535 - 2**12 + 1, 65536))
  command = train_command(tmp_path, data_root, "--rounds", "2")
  job = []
  for p in range(PROCESSES):
    slurm = {
      "SLURM_JOB_ID": str(port - (65535 - 2**12 + 1)),
      "SLURM_STEP_NODELIST": "127.0.0.1",
      "SLURM_NTASKS": str(PROCESSES),
      "SLURM_PROCID": str(p),
      "SLURM_LOCALID": str(p),
    }
    job.append(
      subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO,
        env={**environment(DEVICES_EACH), **slurm},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  (code0, out0, err0), (code1, out1, err1) = finish(job)
  assert (code0, code1) == (0, 0), err0[-2000:] + err1[-2000:]
  # Process 0 reports and writes; process 1 (a non-writer, so it did join) prints nothing but
  # gloo's connection lines.
  assert "run directory:" in out0
  assert [line for line in out1.splitlines() if not line.startswith("[Gloo]")] == []
  assert (tmp_path / "run" / "summary.json").is_file()


def free_port_in(ports: range) -> int:
  for port in np.random.default_rng().permutation(list(ports)):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", int(port)))
      except OSError:
        continue
      return int(port)
  raise RuntimeError("no free port")
