"""Runs a fedvp_jax algorithm with Flower: simulated, or a server and clients over the network.

``fedvp-flower`` (or ``python -m fedvp_jax.flower``) commands:

* ``simulate``: every client on this machine, in Flower's simulation engine;
* ``serve``: the server: a SuperLink on ``--host:--port`` and the run's ServerApp; waits for
  the clients, runs the rounds, writes the run folder (``--out``) and stops;
* ``client``: one client node (a SuperNode) for viewer ``--user``, connecting to a server.

Examples::

  fedvp-flower simulate --algorithm fedavg --num-clients 4 --rounds 3 --out runs/fl-sim
  fedvp-flower serve --algorithm fedavg --num-clients 3 --rounds 3 --out runs/fl \\
    --port 9092 --insecure
  fedvp-flower client --superlink 127.0.0.1:9092 --user 12 --insecure

See docs/flower.md for several machines and TLS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedvp_jax.cli.common import command, command_parser
from fedvp_jax.cli.flags import add_settings, config_from, given_settings
from fedvp_jax.errors import ConfigError
from fedvp_jax.rundir import RunDir


def _add_tls(p: argparse.ArgumentParser, server: bool) -> None:
  group = p.add_argument_group("connection security (give --insecure or the TLS files)")
  group.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS")
  if server:
    group.add_argument("--ssl-certfile", help="the SuperLink's TLS certificate (PEM)")
    group.add_argument("--ssl-keyfile", help="its private key (PEM)")
  group.add_argument(
    "--ssl-ca-certfile",
    "--root-certificates",
    dest="ssl_ca_certfile",
    help="the CA certificate that signed the SuperLink's certificate (PEM)",
  )


def build_parser() -> argparse.ArgumentParser:
  """The ``fedvp-flower`` parser."""
  parser = command_parser(__doc__ or "", "fedvp-flower")
  commands = parser.add_subparsers(dest="command", required=True)
  sim = commands.add_parser("simulate", help="all clients on this machine (Flower's simulation)")
  add_settings(sim)
  sim.add_argument(
    "--out", type=Path, help="the run directory to write (as fedvp train does); none if not given"
  )
  sim.add_argument(
    "--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default 1)"
  )
  serve = commands.add_parser("serve", help="the server: SuperLink and the run's ServerApp")
  add_settings(serve)
  serve.add_argument("--out", type=Path, required=True, help="the run folder")
  serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
  serve.add_argument("--port", type=int, default=9092, help="port to listen on (default 9092)")
  serve.add_argument(
    "--round-timeout",
    type=float,
    default=600.0,
    help="seconds to wait for a round's replies; later ones are left out (default 600)",
  )
  serve.add_argument(
    "--connect-timeout",
    type=float,
    default=600.0,
    help="seconds to wait for every client to connect (default 600)",
  )
  _add_tls(serve, server=True)
  client = commands.add_parser("client", help="one client node (a SuperNode)")
  client.add_argument("--superlink", required=True, help="the server's HOST:PORT")
  who = client.add_mutually_exclusive_group(required=True)
  who.add_argument("--user", help="this client's viewer")
  who.add_argument("--partition", type=int, help="this client's index in the run's viewers")
  client.add_argument("--data-dir", help="the folder with this viewer's traces")
  client.add_argument(
    "--config", help="a config.json this client must run (a server with other settings is refused)"
  )
  client.add_argument("--port", type=int, help="the node's local port for its app processes")
  _add_tls(client, server=False)
  return parser


def _tls(args: argparse.Namespace, server: bool) -> Any:
  from fedvp_jax.flower.deploy import Tls

  # Absolute paths: Flower's connection file refuses relative ones.
  absolute = lambda path: None if path is None else str(Path(path).resolve())
  tls = Tls(
    args.insecure,
    absolute(getattr(args, "ssl_certfile", None)),
    absolute(getattr(args, "ssl_keyfile", None)),
    absolute(args.ssl_ca_certfile),
  )
  tls.check(server)
  return tls


def _print_run(records: Sequence[dict[str, Any]], summary: dict[str, Any], out: Any) -> None:
  """The rounds' records, one JSON line each, then the run's summary in two lines."""
  for record in records:
    print(json.dumps(record))
  seed = summary["seeds"][0]
  gains = ", ".join("nan" if g is None else f"{g:+.1f}" for g in summary["gain_percent"])
  print(
    f"final: Average Global Loss {summary['final_loss_mean']}; selected on validation (round "
    f"{seed['selected']['round']}): {summary['selected_loss_mean']}; gain over the best trivial "
    f"predictor [{gains}] %"
  )
  if seed["missing_clients"]:
    print(f"WARNING: clients {seed['missing_clients']} missed the final evaluation")
  if out is not None:
    print(f"run directory: {out}")


def _simulate_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  from fedvp_jax.flower.simulation import simulate

  config = config_from(parser, given_settings(args))
  if args.out is not None and RunDir(args.out).exists():  # before Ray starts
    raise ConfigError(f"run directory {args.out} already exists; choose another --out")
  result = simulate(config, cpus_per_client=args.cpus_per_client, out=args.out)
  _print_run(result.records, result.summary, args.out)
  return 0


def _serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  from fedvp_jax.flower import deploy
  from fedvp_jax.flower.setup import build_setup

  config = config_from(parser, given_settings(args))
  build_setup(config)  # refuse unsupported settings before starting anything
  tls = _tls(args, server=True)
  local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
  app = deploy.write_run_folder(
    args.out,
    config,
    f"{local}:{args.port}",
    tls,
    round_timeout=args.round_timeout,
    connect_timeout=args.connect_timeout,
  )
  log = (args.out / "superlink.log").open("w")
  # Flower keeps its state (installed app bundles) under FLWR_HOME: the run folder's, not ~/.flwr.
  env = deploy.flower_env(FLWR_HOME=str(args.out.resolve() / "flwr-home"))
  server = subprocess.Popen(
    deploy.superlink_command(args.host, args.port, tls),
    stdout=log,
    stderr=subprocess.STDOUT,
    env=env,
  )
  try:
    deploy.wait_for_port(local, args.port, 60.0, server)
    wanted = "every viewer as a client" if config.clients is None else f"{config.clients} clients"
    print(f"SuperLink on {args.host}:{args.port}; waiting for {wanted}", flush=True)
    deploy.submit(app, args.out)
    found = deploy.wait_for_result(args.out, None, server)
  finally:
    server.send_signal(signal.SIGTERM)
    try:
      server.wait(30)
    except subprocess.TimeoutExpired:
      server.kill()
    log.close()
  _print_run(RunDir(args.out).read_metrics(config.seed), found, args.out)
  return 0


def _client_command(args: argparse.Namespace) -> int:
  from fedvp_jax.flower import deploy

  tls = _tls(args, server=False)
  node = deploy.supernode_command(
    args.superlink,
    tls,
    user=args.user,
    partition=args.partition,
    data_dir=args.data_dir,
    config=str(Path(args.config).resolve()) if args.config else None,
    port=args.port,
  )
  env = deploy.flower_env()
  os.execve(node[0], node, env)  # this process becomes the SuperNode: a signal reaches it


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``fedvp-flower``; returns the exit code."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command == "simulate":
    return command(lambda: _simulate_command(parser, args))
  if args.command == "serve":
    return command(lambda: _serve_command(parser, args))
  return command(lambda: _client_command(args))


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
  sys.exit(main())
