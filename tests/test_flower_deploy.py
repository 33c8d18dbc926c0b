"""Flower's deployment engine on localhost: ``fedvp-flower serve`` (a SuperLink and the run's
ServerApp) and three ``fedvp-flower client`` processes (SuperNodes, each told only its own
viewer), talking over 127.0.0.1 on free ports. The run's metrics, final model and summary equal
the vmapped rounds' (which tests/test_flower.py shows the simulation equals); a client killed
mid-round is left out of that round and the run goes on, its absence in the records.

No wall-clock race decides an outcome: the server waits for every reply (no round timeout
short enough to drop a slow client on a loaded machine), a client is frozen mid-round by a
fault injected into its own processes (``sitecustomize``, below) before it is killed, and the
SuperLink's heartbeat check (Flower's failure handling) reports the dead node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from fedvp_jax.algorithms.core import clients_state
from fedvp_jax.config import SCHEMA, RunConfig, get
from fedvp_jax.flower.deploy import free_port
from fedvp_jax.flower.setup import build_setup, run_users
from fedvp_jax.flower.wire import from_named
from fedvp_jax.rundir import RunDir
from fedvp_jax.runner import run as engine_run_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_flower import SMALL, assert_same_summary, engine_run, flower_lock, needs_flwr

pytestmark = [needs_flwr, pytest.mark.slow]

CONFIG = SMALL.replace(num_clients=3, rounds=3)


def setting_flags(config: RunConfig) -> list[str]:
  """Command-line flags giving ``config``'s settings that differ from the defaults."""
  flags = []
  for name, s in SCHEMA.items():
    value, default = get(config, name), s.default
    if value != default and value is not None:
      flags += [s.flag, ",".join(value) if isinstance(value, tuple) else str(value)]
  return flags


FREEZE = """\
# Injected by tests/test_flower_deploy.py into one client's processes: its client app freezes
# (SIGSTOP) once it has received round ROUND's train message, after writing MARKER; the test
# then kills the client. A device that dies mid-round, at a known point.
import os, signal

_round, _marker = os.environ["FEDVP_TEST_FREEZE"].split(":", 1)
from fedvp_jax.flower import client as _client

_train = _client.train


def _freezing_train(msg, context):
  if int(msg.content["config"]["round"]) == int(_round):
    with open(_marker, "w") as f:
      f.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)
  return _train(msg, context)


_client.train = _freezing_train
"""


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
  # Its own session, so that killing it takes its SuperNode's app processes along.
  return subprocess.Popen(
    [sys.executable, "-m", "fedvp_jax.flower", *args],
    stdout=log.open("w"),
    stderr=subprocess.STDOUT,
    start_new_session=True,
    env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **env},
  )


def stop(process: subprocess.Popen) -> None:
  if process.poll() is None:
    os.killpg(process.pid, signal.SIGKILL)
  process.wait(30)


class Deployment:
  """``config`` run by a server and 3 clients, started at once; ``kill = (client, round)``
  freezes that client once it has received that round's message, then kills it."""

  def __init__(self, tmp: Path, config: RunConfig, kill: tuple[int, int] | None = None):
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    self.tmp, self.kill, self.killed = tmp, kill, False
    self.out, self.marker = tmp / "run", tmp / "frozen"
    self.server = start(
      ["serve", *setting_flags(config), "--out", str(self.out), "--port", str(port), "--insecure"],
      tmp / "server.log",
    )
    faults: dict[int, dict[str, str]] = {}
    if kill is not None:
      (tmp / "fault").mkdir()
      (tmp / "fault" / "sitecustomize.py").write_text(FREEZE)
      path = os.pathsep.join([str(tmp / "fault"), os.environ.get("PYTHONPATH", "")])
      faults[kill[0]] = {"PYTHONPATH": path, "FEDVP_TEST_FREEZE": f"{kill[1]}:{self.marker}"}
    self.clients = [
      start(
        ["client", "--superlink", f"127.0.0.1:{port}", "--user", user, "--insecure"],
        tmp / f"client{i}.log",
        **faults.get(i, {}),
      )
      for i, user in enumerate(run_users(config))
    ]

  def running(self) -> bool:
    """Whether the server still runs; kills the client to kill once it is frozen."""
    if self.kill is not None and not self.killed and self.marker.exists():
      stop(self.clients[self.kill[0]])
      self.killed = True
    return self.server.poll() is None

  def stop(self) -> None:
    for process in [self.server, *self.clients]:
      stop(process)

  def result(self) -> tuple[RunDir, str]:
    """The run directory and the server's output, once the server has exited."""
    output = (self.tmp / "server.log").read_text()
    assert self.server.poll() == 0, output[-3000:]
    assert self.kill is None or self.killed, "the client to kill never got that round's message"
    return RunDir(self.out), output


def wait(deployments: list[Deployment]) -> None:
  """Until every deployment's server has exited. A safety net for a hung run only: nothing
  depends on how fast the rounds go."""
  deadline = time.monotonic() + 1200
  while any([d.running() for d in deployments]) and time.monotonic() < deadline:
    time.sleep(0.2)


def test_deployed_run_matches_the_vmapped_rounds_and_survives_a_killed_client(tmp_path):
  def same_metrics(ours, theirs):
    assert ours.keys() - {"missing_clients", "seconds"} == theirs.keys() - {"seconds"}
    for name in ("train_loss", "test_loss", "validation_loss"):
      assert ours[name] == pytest.approx(theirs[name], rel=1e-5), (ours["round"], name)

  # Two deployments at once (each server waits for its own clients only; the killed one idles
  # until Flower's heartbeat check reports its dead client), and the vmapped reference runs in
  # this process meanwhile.
  deployments: list[Deployment] = []
  with flower_lock():
    try:
      whole = Deployment(tmp_path / "whole", CONFIG)
      deployments.append(whole)
      # Client 2 frozen once it got round 1's message, then killed. (Two rounds: every round
      # costs each client a fresh app process, about 15 s here.)
      killed = Deployment(tmp_path / "killed", CONFIG.replace(rounds=2), kill=(2, 1))
      deployments.append(killed)
      state, expected = engine_run(CONFIG)
      engine_run_dir(CONFIG, tmp_path / "engine")
      wait(deployments)
    finally:
      for deployment in deployments:
        deployment.stop()
  like = build_setup(CONFIG).params_like()
  engine_params = clients_state(jax.device_get(state)).server_params

  run, output = whole.result()
  records = run.read_metrics(CONFIG.seed)
  assert run.read_record()["users"] == list(run_users(CONFIG))
  assert run.read_config() == CONFIG and run.is_finished()
  assert [r["missing_clients"] for r in records] == [[], [], []]
  for ours, theirs in zip(records, expected, strict=True):
    same_metrics(ours, theirs)
  with np.load(run.path / "params.npz") as f:
    params = {n: f[n] for n in f.files if not n.startswith(("selected/", "generator/"))}
  chex.assert_trees_all_close(from_named(params, like), engine_params, rtol=1e-5, atol=1e-6)
  assert_same_summary(run.read_summary(), RunDir(tmp_path / "engine").read_summary())
  assert '"round": 2' in output and "run directory:" in output  # the command printed them

  # The killed client is left out of round 1, which still aggregates the other two, and of
  # the final evaluation; round 0 is as in the whole run.
  run, output = killed.result()
  rounds = run.read_metrics(CONFIG.seed)
  assert [r["missing_clients"] for r in rounds] == [[], [2]]
  same_metrics(rounds[0], expected[0])
  assert all(np.isfinite(r["train_loss"]) and r["excluded_clients"] == [] for r in rounds)
  assert rounds[1]["train_loss"] != pytest.approx(expected[1]["train_loss"], rel=1e-5)
  summary = run.read_summary()
  assert summary["seeds"][0]["missing_clients"] == [2]
  assert "clients [2] missed the final evaluation" in output
  assert all(np.isfinite(v) for v in summary["orthodromic_deg_mean"])
