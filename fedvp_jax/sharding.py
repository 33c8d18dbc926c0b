"""Sharding the clients axis over devices.

Every per-client array has the clients axis first, so scaling past one device is a matter of
placement: :class:`~fedvp_jax.data.ClientData` and the clients' params and optimizer states
are split along a one-dimensional ``"clients"`` mesh, everything else (the server model, the
generator, round counters) is replicated, and ``jax.jit`` propagates the placement through the
round (GSPMD). Results equal single-device results up to float reduction order.

A number of clients that does not divide over the devices is padded with rows of no windows
(:func:`pad_rows`), which never train and add nothing to any error sum. In a job of several
processes (:mod:`fedvp_jax.distributed`) the mesh spans every process's devices, and each
process builds only the rows its own devices hold (:func:`local_rows`, :func:`assemble`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from fedvp_jax.algorithms.core import ClientsState
from fedvp_jax.data.federated import ClientData
from fedvp_jax.errors import SettingError

CLIENTS_AXIS = "clients"


def client_mesh(num_devices: int | None = None) -> Mesh:
  """A one-dimensional mesh named ``"clients"`` over the first ``num_devices`` devices of the
  default kind (the one a ``jax.default_device`` block, e.g. the script's ``--device``, chose).

  In a job of several processes the mesh spans every process's devices: ``num_devices`` is
  then their total, or ``None``.

  Raises:
    SettingError: when fewer devices are visible, or a multi-process job has more.
  """
  default = getattr(jax.config, "jax_default_device", None)
  available = jax.devices(default.platform) if default is not None else jax.devices()
  if num_devices is None:
    num_devices = len(available)
  if not 1 <= num_devices <= len(available):
    visible = f"{len(available)} {available[0].platform} device(s) are visible"
    raise SettingError("devices", num_devices, visible)
  if jax.process_count() > 1 and num_devices != len(available):
    raise SettingError(
      "devices",
      num_devices,
      f"a job of {jax.process_count()} processes uses all of their {len(available)} devices; "
      "leave it out or give that number",
    )
  return jax.make_mesh(
    (num_devices,), (CLIENTS_AXIS,), axis_types=(AxisType.Auto,), devices=available[:num_devices]
  )


def split_clients(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` with its leading (clients) axis split over ``mesh``."""
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))
  return jax.tree.map(lambda leaf: jax.device_put(leaf, sharding), tree)


def padded_rows(num_clients: int, mesh: Mesh) -> int:
  """The rows of a clients axis of ``num_clients`` split over ``mesh``: the next multiple of
  its devices."""
  return math.ceil(num_clients / mesh.devices.size) * mesh.devices.size


def pad_rows(data: ClientData, rows: int) -> ClientData:
  """``data`` with rows of padding appended up to ``rows``: no windows (masks False), the
  direction (1, 0, 0) everywhere (see :func:`~fedvp_jax.data.federated.stack_windows`)."""
  extra = rows - data.num_rows

  def pad(leaf: jax.Array) -> jax.Array:
    fill = jnp.zeros((extra, *leaf.shape[1:]), leaf.dtype)
    if leaf.dtype != jnp.bool_:
      fill = fill.at[..., 0].set(1)
    return jnp.concatenate([leaf, fill])

  return jax.tree.map(pad, data).replace(clients=data.num_clients)


def shard_data(data: ClientData, mesh: Mesh) -> ClientData:
  """Splits every client array of ``data`` over ``mesh``, padded with rows of no windows when
  the clients do not divide evenly over its devices."""
  rows = padded_rows(data.num_clients, mesh)
  return split_clients(pad_rows(data, rows) if rows > data.num_rows else data, mesh)


def local_rows(rows: int, mesh: Mesh) -> list[int]:
  """The rows of a clients axis of ``rows`` (a multiple of ``mesh``'s devices) that this
  process's devices hold, in order."""
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))
  held: set[int] = set()
  for index in sharding.addressable_devices_indices_map((rows,)).values():
    assert index is not None
    held.update(range(rows)[index[0]])
  return sorted(held)


def assemble(local: Any, mesh: Mesh, rows: int) -> Any:
  """Global arrays of ``rows`` rows split over ``mesh`` from this process's part of them:
  ``local`` holds, for every leaf, the rows :func:`local_rows` lists (in that order), and no
  process holds any other."""
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))
  return jax.tree.map(
    lambda leaf: jax.make_array_from_process_local_data(
      sharding, np.asarray(leaf), (rows, *np.shape(leaf)[1:])
    ),
    local,
  )


def per_client(state: Any) -> Any:
  """A tree of bools shaped like ``state`` (concrete or abstract): True for the leaves with a
  clients axis, the per-client parts of every :class:`~fedvp_jax.algorithms.ClientsState`
  (FedAvg's state is one, FedGen's holds one beside the generator)."""

  def mark(node: Any) -> Any:
    if isinstance(node, ClientsState):
      # Everything per client; the rest (server models, counters, losses) is not.
      marked = jax.tree.map(lambda _: False, node)
      return marked.replace(
        client_params=jax.tree.map(lambda _: True, node.client_params),
        client_opt_state=jax.tree.map(lambda _: True, node.client_opt_state),
        selected=marked.selected.replace(
          client_params=jax.tree.map(lambda _: True, node.selected.client_params)
        ),
      )
    return jax.tree.map(lambda _: False, node)

  return jax.tree.map(mark, state, is_leaf=lambda node: isinstance(node, ClientsState))


def state_shardings(state: Any, mesh: Mesh | None, *, seeds_axis: bool = False) -> Any:
  """Where every leaf of an algorithm's state goes: a tree of shardings shaped like ``state``.

  The per-client leaves (:func:`per_client`) are split over ``mesh``'s clients axis and the
  rest is replicated; with ``mesh=None`` everything sits on the default device. ``state`` may
  be abstract (``jax.ShapeDtypeStruct`` leaves), which is how a checkpoint is restored
  straight onto the devices of the run that reads it, whatever devices wrote it.

  Args:
    state: an algorithm's state, concrete or abstract.
    mesh: a ``"clients"`` mesh from :func:`client_mesh`, or ``None``.
    seeds_axis: the leaves have a leading seeds axis before the clients axis (see
      :func:`~fedvp_jax.algorithms.over_seeds`); it is never split.
  """
  if mesh is None:
    default = getattr(jax.config, "jax_default_device", None) or jax.local_devices()[0]
    single = SingleDeviceSharding(default)
    return jax.tree.map(lambda _: single, state)
  seeds = (None,) if seeds_axis else ()
  split = NamedSharding(mesh, PartitionSpec(*seeds, CLIENTS_AXIS))
  whole = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda clients: split if clients else whole, per_client(state))


def resize_clients(state: Any, rows: int, *, seeds_axis: bool = False) -> Any:
  """``state`` (host arrays) with ``rows`` rows on its clients axis: cut, or extended with
  copies of row 0 (finite models for padding rows, whose masks drop them everywhere). A
  checkpoint of a run whose clients were padded for other devices continues on these."""
  axis = 1 if seeds_axis else 0

  def resize(leaf: Any, clients: bool) -> Any:
    leaf = np.asarray(leaf)
    if not clients or leaf.shape[axis] == rows:
      return leaf
    kept = np.take(leaf, range(min(rows, leaf.shape[axis])), axis=axis)
    extra = rows - kept.shape[axis]
    if extra <= 0:
      return kept
    fill = np.repeat(np.take(leaf, [0], axis=axis), extra, axis=axis)
    return np.concatenate([kept, fill], axis=axis)

  return jax.tree.map(resize, state, per_client(state))


def place(state: Any, shardings: Any) -> Any:
  """Host arrays put where ``shardings`` say, also over several processes' devices (each
  process puts the parts its own devices hold)."""

  def put(leaf: Any, sharding: Any) -> jax.Array:
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, state, shardings)


def replicate_keys(keys: Any, mesh: Mesh) -> Any:
  """PRNG keys made on the host (or one device), replicated on every device of ``mesh``: a
  program over several processes' devices takes no input committed to one device."""
  whole = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
    lambda key: jax.random.wrap_key_data(
      jax.device_put(np.asarray(jax.random.key_data(key)), whole)
    ),
    keys,
  )


def shard_state(state: Any, mesh: Mesh, *, seeds_axis: bool = False) -> Any:
  """Places ``state`` as :func:`state_shardings` says."""
  return jax.device_put(state, state_shardings(state, mesh, seeds_axis=seeds_axis))


__all__ = [
  "CLIENTS_AXIS",
  "assemble",
  "client_mesh",
  "local_rows",
  "pad_rows",
  "padded_rows",
  "per_client",
  "place",
  "replicate_keys",
  "resize_clients",
  "shard_data",
  "shard_state",
  "split_clients",
  "state_shardings",
]
