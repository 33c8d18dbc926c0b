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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from fedvp_jax.algorithms.core import ClientsState
from fedvp_jax.data.federated import ClientData
from fedvp_jax.errors import SettingError

CLIENTS_AXIS = "clients"


def client_mesh(num_devices: int) -> Mesh:
  """A one-dimensional mesh named ``"clients"`` over the first ``num_devices`` devices of the
  default kind (the one a ``jax.default_device`` block, e.g. the script's ``--device``, chose).

  Raises:
    SettingError: when fewer devices are visible.
  """
  default = getattr(jax.config, "jax_default_device", None)
  available = jax.devices(default.platform) if default is not None else jax.devices()
  if not 1 <= num_devices <= len(available):
    visible = f"{len(available)} {available[0].platform} device(s) are visible"
    raise SettingError("devices", num_devices, visible)
  return jax.make_mesh(
    (num_devices,), (CLIENTS_AXIS,), axis_types=(AxisType.Auto,), devices=available[:num_devices]
  )


def split_clients(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` with its leading (clients) axis split over ``mesh``."""
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))
  return jax.tree.map(lambda leaf: jax.device_put(leaf, sharding), tree)


def shard_data(data: ClientData, mesh: Mesh) -> ClientData:
  """Splits every client array of ``data`` over ``mesh``.

  Raises:
    SettingError: when the clients do not divide evenly over the devices.
  """
  devices = mesh.devices.size
  if data.num_clients % devices:
    raise SettingError(
      "devices",
      devices,
      f"the {data.num_clients} clients do not divide evenly over them; choose a number of "
      "clients that is a multiple of the number of devices",
    )
  return split_clients(data, mesh)


def state_shardings(state: Any, mesh: Mesh | None, *, seeds_axis: bool = False) -> Any:
  """Where every leaf of an algorithm's state goes: a tree of shardings shaped like ``state``.

  The per-client parts of every :class:`~fedvp_jax.algorithms.ClientsState` (FedAvg's state
  is one, FedGen's holds one beside the generator) are split over ``mesh``'s clients axis and
  the rest is replicated; with ``mesh=None`` everything sits on the default device. ``state``
  may be abstract (``jax.ShapeDtypeStruct`` leaves), which is how a checkpoint is restored
  straight onto the devices of the run that reads it, whatever devices wrote it.

  Args:
    state: an algorithm's state, concrete or abstract.
    mesh: a ``"clients"`` mesh from :func:`client_mesh`, or ``None``.
    seeds_axis: the leaves have a leading seeds axis before the clients axis (see
      :func:`~fedvp_jax.algorithms.over_seeds`); it is never split.
  """
  if mesh is None:
    default = getattr(jax.config, "jax_default_device", None) or jax.devices()[0]
    single = SingleDeviceSharding(default)
    return jax.tree.map(lambda _: single, state)
  seeds = (None,) if seeds_axis else ()
  split = NamedSharding(mesh, PartitionSpec(*seeds, CLIENTS_AXIS))
  whole = NamedSharding(mesh, PartitionSpec())

  def place(node: Any) -> Any:
    if isinstance(node, ClientsState):
      return ClientsState(
        server_params=jax.tree.map(lambda _: whole, node.server_params),
        client_params=jax.tree.map(lambda _: split, node.client_params),
        client_opt_state=jax.tree.map(lambda _: split, node.client_opt_state),
        round=jax.tree.map(lambda _: whole, node.round),
      )
    return jax.tree.map(lambda _: whole, node)

  return jax.tree.map(place, state, is_leaf=lambda node: isinstance(node, ClientsState))


def shard_state(state: Any, mesh: Mesh, *, seeds_axis: bool = False) -> Any:
  """Places ``state`` as :func:`state_shardings` says."""
  return jax.device_put(state, state_shardings(state, mesh, seeds_axis=seeds_axis))


__all__ = [
  "CLIENTS_AXIS",
  "client_mesh",
  "shard_data",
  "shard_state",
  "split_clients",
  "state_shardings",
]
