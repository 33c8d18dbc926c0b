"""Flower's deployment engine on localhost: ``fedvp-flower serve`` (a SuperLink and the run's
ServerApp) and three ``fedvp-flower client`` processes (SuperNodes, each told only its own
viewer), talking over 127.0.0.1 on free ports. The run's metrics and final model equal the
vmapped rounds' (which tests/test_flower.py shows the simulation equals); a client killed
mid-round is left out of that round and the run goes on, its absence in the records."""

from __future__ import annotations

import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_flower import SMALL, engine_run, flower_lock, needs_flwr

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


def start(args: list[str], log: Path) -> subprocess.Popen:
  # Its own session, so that killing it takes its SuperNode's app processes along.
  return subprocess.Popen(
    [sys.executable, "-m", "fedvp_jax.flower", *args],
    stdout=log.open("w"),
    stderr=subprocess.STDOUT,
    start_new_session=True,
    env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
  )


def stop(process: subprocess.Popen) -> None:
  if process.poll() is None:
    os.killpg(process.pid, signal.SIGKILL)
  process.wait(30)


def deploy(tmp: Path, kill: tuple[int, int] | None = None) -> tuple[dict, dict, str]:
  """Runs CONFIG with a server and 3 clients; ``kill = (client, round)`` kills that client's
  process once it received that round's message. Returns (records.json, params.npz, the
  server's output)."""
  tmp.mkdir(parents=True, exist_ok=True)
  port = free_port()
  users = run_users(CONFIG)
  out = tmp / "run"
  server = start(
    [
      "serve",
      *setting_flags(CONFIG),
      "--out",
      str(out),
      "--port",
      str(port),
      "--insecure",
      "--round-timeout",
      "45",
      "--connect-timeout",
      "120",
    ],
    tmp / "server.log",
  )
  clients = [
    start(
      ["client", "--superlink", f"127.0.0.1:{port}", "--user", user, "--insecure"],
      tmp / f"client{i}.log",
    )
    for i, user in enumerate(users)
  ]
  try:
    deadline = time.monotonic() + 400
    killed = False
    while server.poll() is None and time.monotonic() < deadline:
      if kill is not None and not killed:
        text = (tmp / f"client{kill[0]}.log").read_text()
        marker = f"ROUND {kill[1]}]"
        if marker in text and "Receiving: train" in text.split(marker, 1)[1]:
          stop(clients[kill[0]])
          killed = True
      time.sleep(0.2)
    output = (tmp / "server.log").read_text()
    assert server.poll() == 0, output[-3000:]
    assert kill is None or killed, "the client to kill never got that round's message"
  finally:
    for process in [server, *clients]:
      stop(process)
  records = json.loads((out / "records.json").read_text())
  with np.load(out / "params.npz") as f:
    params = dict(f)
  return records, params, output


def test_deployed_run_matches_the_vmapped_rounds_and_survives_a_killed_client(tmp_path):
  state, expected = engine_run(CONFIG)
  like = build_setup(CONFIG).params_like()
  engine_params = clients_state(jax.device_get(state)).server_params

  def same_metrics(ours, theirs):
    assert ours.keys() - {"missing_clients", "seconds"} == theirs.keys()
    for name in ("train_loss", "test_loss", "validation_loss"):
      assert ours[name] == pytest.approx(theirs[name], rel=1e-5), (ours["round"], name)

  with flower_lock():
    records, params, output = deploy(tmp_path / "whole")
  assert records["users"] == list(run_users(CONFIG))
  assert [r["missing_clients"] for r in records["records"]] == [[], [], []]
  for ours, theirs in zip(records["records"], expected, strict=True):
    same_metrics(ours, theirs)
  chex.assert_trees_all_close(from_named(params, like), engine_params, rtol=1e-5, atol=1e-6)
  assert '"round": 2' in output  # the command printed the rounds

  # Client 2 killed once it got round 1's message: left out of rounds 1 and 2, which still
  # aggregate the other two; round 0 is as before.
  with flower_lock():
    records, params, _ = deploy(tmp_path / "killed", kill=(2, 1))
  rounds = records["records"]
  assert [r["missing_clients"] for r in rounds] == [[], [2], [2]]
  same_metrics(rounds[0], expected[0])
  assert all(np.isfinite(r["train_loss"]) and r["excluded_clients"] == [] for r in rounds)
  assert rounds[1]["train_loss"] != pytest.approx(expected[1]["train_loss"], rel=1e-5)
  final = from_named(params, like)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(final))
