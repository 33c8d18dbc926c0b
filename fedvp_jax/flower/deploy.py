"""Flower's deployment engine for a fedvp_jax run: the files and command lines of a server
(a SuperLink with the run's ServerApp) and of client nodes (SuperNodes), on one machine or
many. No Flower import here: it drives Flower's own commands (``flower-superlink``,
``flower-supernode``, ``flwr run``), installed with the ``flower`` extra.

A run folder (``out``) holds ``app/settings.json`` (the run's settings), ``app/pyproject.toml``
(the Flower app whose components are :data:`fedvp_jax.flower.apps.server_app` and
:data:`fedvp_jax.flower.apps.client_app`, its run config pointing at ``app/settings.json`` and
``out``), ``flwr-home/config.toml`` (the connection ``flwr run`` submits through) and what the
ServerApp writes there: a run directory as ``fedvp train`` leaves one (``config.json``,
``seed<k>/metrics.jsonl`` round by round, ``summary.json`` last; see
:func:`fedvp_jax.flower.server.run_server`), or ``error.txt`` when it stopped on an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.errors import ConfigError, FedVPError
from fedvp_jax.rundir import RunDir

CONNECTION = "fedvp"
"""The name of the SuperLink connection in the run folder's ``flwr-home/config.toml``."""


@dataclasses.dataclass(frozen=True)
class Tls:
  """How a connection is secured: ``insecure`` (plain HTTP, for a trusted network or
  localhost), else TLS with the server's certificate and key (SuperLink) and the CA
  certificate that signed it (every client and ``flwr run``)."""

  insecure: bool = False
  certfile: str | None = None
  keyfile: str | None = None
  ca_certfile: str | None = None

  def check(self, server: bool) -> None:
    """Raises FedVPError unless the options make a usable connection."""
    if self.insecure:
      return
    needed = {"--ssl-ca-certfile": self.ca_certfile}
    if server:
      needed |= {"--ssl-certfile": self.certfile, "--ssl-keyfile": self.keyfile}
    missing = [flag for flag, value in needed.items() if not value]
    if missing:
      raise FedVPError(f"give {' and '.join(missing)} for TLS, or --insecure for plain HTTP")
    for flag, value in needed.items():
      if not Path(str(value)).is_file():
        raise FedVPError(f"{flag} {value}: no such file")


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port on ``host`` that nothing listens on now."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def flower_command(name: str) -> str:
  """The path of one of Flower's commands, beside this Python's if it is there."""
  beside = Path(sys.executable).parent / name
  found = str(beside) if beside.exists() else shutil.which(name)
  if found is None:
    raise FedVPError(
      f"{name} not found: install the flower extra (pip install 'fedvp_jax[flower]')"
    )
  return found


def flower_env(**extra: str) -> dict[str, str]:
  """This process's environment for Flower's commands: this Python's ``bin`` folder first on
  ``PATH`` (Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
  name), telemetry off unless asked for, and ``extra``."""
  env = dict(os.environ)
  env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
  env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
  return env | extra


def write_run_folder(
  out: Path,
  config: RunConfig,
  superlink: str,
  tls: Tls,
  *,
  round_timeout: float | None = None,
  connect_timeout: float = 600.0,
) -> Path:
  """Writes the run folder's ``app/`` and ``flwr-home/`` (see the module doc) and returns the
  app folder.

  Raises:
    ConfigError: when ``out`` is a run directory already (it holds a ``config.json``).
  """
  out = out.resolve()
  if RunDir(out).exists():
    raise ConfigError(f"run directory {out} already exists; choose another --out")
  app = out / "app"
  home = out / "flwr-home"
  app.mkdir(parents=True, exist_ok=True)
  home.mkdir(parents=True, exist_ok=True)
  (app / "settings.json").write_text(json.dumps(to_record(config), indent=1))
  run_config = {
    "config": str(app / "settings.json"),
    "out": str(out),
    "connect-timeout": float(connect_timeout),
  }
  if round_timeout is not None:
    run_config["round-timeout"] = float(round_timeout)
  lines = [
    "[build-system]",
    'requires = ["hatchling"]',
    'build-backend = "hatchling.build"',
    "",
    "[project]",
    'name = "fedvpflower"',
    'version = "1.0.0"',
    'description = "A fedvp_jax run as a Flower app (fedvp_jax.flower)"',
    'license = "Apache-2.0"',
    "dependencies = []",
    "",
    "[tool.flwr.app]",
    'publisher = "fedvp"',
    "",
    "[tool.flwr.app.components]",
    'serverapp = "fedvp_jax.flower.apps:server_app"',
    'clientapp = "fedvp_jax.flower.apps:client_app"',
    "",
    "[tool.flwr.app.config]",
    *(f"{key} = {json.dumps(value)}" for key, value in run_config.items()),
  ]
  (app / "pyproject.toml").write_text("\n".join(lines) + "\n")
  connection = [
    "[superlink]",
    f'default = "{CONNECTION}"',
    "",
    f"[superlink.{CONNECTION}]",
    f'address = "{superlink}"',
    "insecure = true" if tls.insecure else f"root-certificates = {json.dumps(tls.ca_certfile)}",
  ]
  (home / "config.toml").write_text("\n".join(connection) + "\n")
  (out / "error.txt").unlink(missing_ok=True)  # of an earlier attempt that failed
  return app


def superlink_command(host: str, port: int, tls: Tls) -> list[str]:
  """``flower-superlink`` serving clients and ``flwr run`` on ``host:port``."""
  command = [
    flower_command("flower-superlink"),
    "--host",
    host,
    "--port",
    str(port),
    "--disable-runtime-dependency-installation",  # fedvp_jax is installed; never pip from here
  ]
  if tls.insecure:
    return command + ["--insecure"]
  return command + [
    "--ssl-certfile",
    str(tls.certfile),
    "--ssl-keyfile",
    str(tls.keyfile),
    "--ssl-ca-certfile",
    str(tls.ca_certfile),
  ]


def supernode_command(
  superlink: str,
  tls: Tls,
  *,
  user: str | None = None,
  partition: int | None = None,
  data_dir: str | None = None,
  config: str | None = None,
  port: int | None = None,
) -> list[str]:
  """``flower-supernode`` for one client: connects to ``superlink`` (``host:port``), is
  viewer ``user`` (or the run's client ``partition``), reads its traces from ``data_dir``,
  and refuses a server whose settings differ from ``config`` (a ``config.json``), when given.
  ``port`` is the node's own local port for its app processes (a free one when ``None``)."""
  if (user is None) == (partition is None):
    raise FedVPError("give the client's --user (its viewer) or its --partition, not both")
  node = {"user": user, "partition-id": partition, "data-dir": data_dir, "config": config}
  node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in node.items() if v is not None)
  command = [
    flower_command("flower-supernode"),
    "--superlink",
    superlink,
    "--host",
    "127.0.0.1",
    "--port",
    str(port or free_port()),
    "--node-config",
    node_config,
  ]
  if tls.insecure:
    return command + ["--insecure"]
  return command + ["--root-certificates", str(tls.ca_certfile)]


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen) -> None:
  """Waits until something accepts connections on ``host:port``."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise FedVPError(f"the SuperLink exited with code {process.returncode} (see its log)")
    with socket.socket() as s:
      s.settimeout(1.0)
      if s.connect_ex((host, port)) == 0:
        return
    time.sleep(0.3)
  raise FedVPError(f"the SuperLink did not listen on {host}:{port} within {timeout:.0f} s")


def submit(app: Path, out: Path) -> None:
  """``flwr run``: hands the app to the SuperLink of the run folder's connection."""
  env = flower_env(FLWR_HOME=str(out.resolve() / "flwr-home"))
  done = subprocess.run(
    [flower_command("flwr"), "run", str(app), CONNECTION],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if done.returncode != 0:
    raise FedVPError(
      f"flwr run failed ({done.returncode}): {_last_message(done.stdout + done.stderr)}"
    )


def _last_message(output: str) -> str:
  """The last message of Flower's CLI output as one line: the text of its last box (Flower
  frames errors in one), else its last line."""
  box = "╭╮╰╯│─ "
  if "╭" in output:
    body = output[output.rindex("╭") :].splitlines()[1:]
    words = [line.strip().strip(box).strip() for line in body]
    return " ".join(w for w in words if w) or "no message"
  lines = [line for line in output.strip().splitlines() if line.strip()]
  return lines[-1].strip() if lines else "no output"


def wait_for_result(out: Path, timeout: float | None, server: subprocess.Popen) -> dict:
  """The run's ``summary.json`` once the ServerApp has written it.

  Raises:
    FedVPError: the server wrote ``error.txt`` (its one-line message), the SuperLink died, or
      ``timeout`` seconds passed.
  """
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    if (out / "error.txt").exists():
      raise FedVPError((out / "error.txt").read_text().strip())
    summary = RunDir(out).read_summary()
    if summary is not None:
      return summary
    if server.poll() is not None:
      raise FedVPError(f"the SuperLink exited with code {server.returncode} before the run ended")
    if deadline is not None and time.monotonic() > deadline:
      raise FedVPError(f"the run did not finish within {timeout:.0f} s")
    time.sleep(0.5)


__all__ = [
  "CONNECTION",
  "Tls",
  "flower_command",
  "flower_env",
  "free_port",
  "submit",
  "superlink_command",
  "supernode_command",
  "wait_for_port",
  "wait_for_result",
  "write_run_folder",
]
