"""Sharding the clients axis over devices.

Every per-client array has the clients axis first, so scaling past one device is a matter of
placement: :class:`~fedvp_jax.data.ClientData` and the clients' params and optimizer states
are split along a one-dimensional ``"clients"`` mesh, everything else (the server model, the
generator, round counters) is replicated, and ``jax.jit`` propagates the placement through the
round (GSPMD). Results equal single-device results up to float reduction order.

Several hosts are not tested yet; ``docs/architecture.md`` says how a launch would go.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedvp_jax.algorithms.core import ClientsState
from fedvp_jax.data.federated import ClientData
from fedvp_jax.errors import ConfigError

CLIENTS_AXIS = "clients"


def client_mesh(num_devices: int) -> Mesh:
  """A one-dimensional mesh named ``"clients"`` over the first ``num_devices`` devices of the
  default kind (the one a ``jax.default_device`` block, e.g. the script's ``--device``, chose).

  Raises:
    ConfigError: when fewer devices are visible.
  """
  default = getattr(jax.config, "jax_default_device", None)
  available = jax.devices(default.platform) if default is not None else jax.devices()
  if not 1 <= num_devices <= len(available):
    raise ConfigError(
      f"--devices {num_devices}: {len(available)} {available[0].platform} device(s) visible"
    )
  return jax.make_mesh(
    (num_devices,), (CLIENTS_AXIS,), axis_types=(AxisType.Auto,), devices=available[:num_devices]
  )


def split_clients(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` with its leading (clients) axis split over ``mesh``."""
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))
  return jax.tree.map(lambda leaf: jax.device_put(leaf, sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a full copy of every leaf of ``tree`` on every device of ``mesh``."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda leaf: jax.device_put(leaf, sharding), tree)


def shard_data(data: ClientData, mesh: Mesh) -> ClientData:
  """Splits every client array of ``data`` over ``mesh``.

  Raises:
    ConfigError: when the clients do not divide evenly over the devices.
  """
  devices = mesh.devices.size
  if data.num_clients % devices:
    raise ConfigError(
      f"--devices {devices}: the {data.num_clients} clients do not divide evenly over "
      f"{devices} devices; choose a number of users that is a multiple of --devices"
    )
  return split_clients(data, mesh)


def shard_state(state: Any, mesh: Mesh) -> Any:
  """Splits the per-client parts of an algorithm's state over ``mesh``, replicates the rest.

  Works for any state that holds a :class:`~fedvp_jax.algorithms.ClientsState` (FedAvg's is
  one, FedGen's holds one beside the generator).
  """

  def place(node: Any) -> Any:
    if isinstance(node, ClientsState):
      return ClientsState(
        server_params=replicate(node.server_params, mesh),
        client_params=split_clients(node.client_params, mesh),
        client_opt_state=split_clients(node.client_opt_state, mesh),
        round=replicate(node.round, mesh),
      )
    return replicate(node, mesh)

  return jax.tree.map(place, state, is_leaf=lambda node: isinstance(node, ClientsState))
