"""A Flower run on one machine: Flower's simulation engine (Ray) with one virtual client node
per viewer, running :data:`fedvp_jax.flower.apps.client_app` against
:func:`fedvp_jax.flower.server.run_server`. Flower is imported when it runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedvp_jax.config import RunConfig
from fedvp_jax.errors import FedVPError
from fedvp_jax.flower.server import ServerResult, run_server
from fedvp_jax.flower.setup import build_setup, run_users


def simulate(
  config: RunConfig,
  *,
  cpus_per_client: float = 1.0,
  quiet: bool = True,
  out: Path | None = None,
) -> ServerResult:
  """Runs ``config`` in Flower's simulation engine and returns the server's result.

  Args:
    config: the run (the FedAvg or FedGen family, without DP).
    out: a run directory to write, as ``fedvp train`` does (see
      :func:`~fedvp_jax.flower.server.run_server`); none when ``None``.
    cpus_per_client: Ray CPUs per client actor: the machine's CPUs over this many clients
      train at once.
    quiet: keep Flower's per-message log lines out of the output.

  Raises:
    FedVPError: for settings a Flower run does not support, a client's refusal, or a
      simulation that ended without finishing its rounds.
  """
  os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
  os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
  from flwr.app import Context
  from flwr.serverapp import Grid, ServerApp
  from flwr.simulation import run_simulation

  from fedvp_jax.flower.apps import client_app

  build_setup(config)  # refuse unsupported settings before starting Ray
  num_clients = len(run_users(config))
  outcome: dict[str, Any] = {}
  server_app = ServerApp()

  @server_app.main()
  def main(grid: Grid, context: Context) -> None:
    try:
      outcome["result"] = run_server(grid, config, out=out)
    except FedVPError as err:  # Flower would log it and carry on: hand it to the caller
      outcome["error"] = err

  if quiet:
    logging.getLogger("flwr").setLevel(logging.WARNING)
  run_simulation(
    server_app=server_app,
    client_app=client_app,
    num_supernodes=num_clients,
    backend_config={
      "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
      "init_args": {"num_cpus": os.cpu_count() or 1, "log_to_driver": not quiet},
    },
  )
  if "error" in outcome:
    raise outcome["error"]
  if "result" not in outcome:
    raise FedVPError("the Flower simulation ended before its rounds finished (see its log above)")
  return outcome["result"]


__all__ = ["simulate"]
