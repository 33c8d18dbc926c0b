"""Clients' windows as stacked, padded device arrays, and a jittable minibatch sampler.

Clients are viewers. Their windows are stacked along a leading clients axis and padded to the
largest client, with a mask marking real windows, so that every per-client operation is a
``vmap`` and nothing in the training loop goes back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedvp_jax.data.datasets import DatasetSpec
from fedvp_jax.data.traces import TraceSet
from fedvp_jax.data.windows import Windows, viewer_windows
from fedvp_jax.errors import DataError, SettingError


class EvalWindows(NamedTuple):
  """Windows to evaluate on, one row per viewer, padded like :class:`ClientData`'s.

  Attributes:
    x: ``f32[viewers, n, M, 3]``.
    y: ``f32[viewers, n, H, 3]``.
    mask: ``bool[viewers, n]``, True for real windows.
  """

  x: jax.Array
  y: jax.Array
  mask: jax.Array


@struct.dataclass
class ClientData:
  """All clients' train, validation and test windows, each padded to a common length.

  The validation windows come from the clients' training traces (see
  :mod:`fedvp_jax.data.windows`); they choose the deployed model, the test windows only
  report on it.

  Attributes:
    train_x: ``f32[clients, n_train, M, 3]`` past unit vectors.
    train_y: ``f32[clients, n_train, H, 3]`` future unit vectors.
    train_mask: ``bool[clients, n_train]``, True for real windows, False for padding.
    test_x: ``f32[clients, n_test, M, 3]``.
    test_y: ``f32[clients, n_test, H, 3]``.
    test_mask: ``bool[clients, n_test]``.
    val_x: ``f32[clients, n_val, M, 3]`` (``n_val`` is 0 without a validation split).
    val_y: ``f32[clients, n_val, H, 3]``.
    val_mask: ``bool[clients, n_val]``.
    clients: how many of the rows are clients (rows ``0 .. clients - 1``); ``None``: all of
      them. Static: part of the tree's structure, not an array.
  """

  train_x: jax.Array
  train_y: jax.Array
  train_mask: jax.Array
  test_x: jax.Array
  test_y: jax.Array
  test_mask: jax.Array
  val_x: jax.Array
  val_y: jax.Array
  val_mask: jax.Array
  clients: int | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def of(cls, train: Any, validation: Any, test: Any, clients: int | None = None) -> ClientData:
    """From the ``(x, y, mask)`` arrays of the train, validation and test windows (NumPy ones
    are put on the default device)."""
    train_x, train_y, train_mask = map(jnp.asarray, train)
    val_x, val_y, val_mask = map(jnp.asarray, validation)
    test_x, test_y, test_mask = map(jnp.asarray, test)
    return cls(
      train_x, train_y, train_mask, test_x, test_y, test_mask, val_x, val_y, val_mask, clients
    )

  @property
  def test(self) -> EvalWindows:
    """The test windows."""
    return EvalWindows(self.test_x, self.test_y, self.test_mask)

  @property
  def validation(self) -> EvalWindows:
    """The validation windows."""
    return EvalWindows(self.val_x, self.val_y, self.val_mask)

  @property
  def num_clients(self) -> int:
    """The clients: the rows that are not padding."""
    return self.num_rows if self.clients is None else self.clients

  @property
  def num_rows(self) -> int:
    """The rows of every array, padding included: the length of the clients axis."""
    return self.train_x.shape[0]

  @property
  def padded(self) -> bool:
    """Some rows are padding, not clients."""
    return self.num_rows != self.num_clients

  @property
  def train_counts(self) -> jax.Array:
    """``f32[clients]`` number of real train windows: FedAvg's aggregation weights."""
    return self.train_mask.sum(axis=1).astype(jnp.float32)

  @property
  def test_counts(self) -> jax.Array:
    """``f32[clients]`` number of real test windows."""
    return self.test_mask.sum(axis=1).astype(jnp.float32)


def select_users(
  traces: TraceSet,
  num_users: int | None = None,
  users: Sequence[str] | None = None,
  seed: int = 0,
  candidates: Sequence[str] | None = None,
) -> tuple[str, ...]:
  """The viewers who become clients: an explicit list, or ``num_users`` drawn with ``seed``.

  Args:
    traces: the dataset.
    num_users: how many viewers to draw (all when both this and ``users`` are None).
    users: explicit viewer names; takes precedence over ``num_users``.
    seed: the draw's seed. The same seed always picks the same viewers.
    candidates: the viewers who may be clients (an evaluation protocol's training users);
      all of the dataset's when ``None``.

  Returns:
    Viewer names in natural order.

  Raises:
    DataError: for unknown names.
    SettingError: for more viewers than the dataset has (``num_clients``).
  """
  pool = traces.users if candidates is None else tuple(candidates)
  if users is not None:
    unknown = [u for u in users if u not in pool]
    if unknown:
      raise DataError(
        f"dataset {traces.name} has no user(s) {', '.join(map(repr, unknown))} that may be "
        f"clients; they are {', '.join(pool)}"
      )
    return tuple(u for u in pool if u in set(users))
  if num_users is None:
    return pool
  if not 1 <= num_users <= len(pool):
    raise SettingError(
      "num_clients",
      num_users,
      f"dataset {traces.name} has {len(pool)} users that may be clients; ask for 1 to {len(pool)}",
    )
  chosen = set(np.random.default_rng(seed).choice(len(pool), num_users, replace=False))
  return tuple(u for i, u in enumerate(pool) if i in chosen)


def stack_windows(
  per_client: Sequence[Windows], length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads clients' windows to the largest (or to ``length``) and stacks them: ``(x, y,
  mask)``."""
  length = max(len(w) for w in per_client) if length is None else length
  rows = len(per_client)
  first = per_client[0]
  # Padding is a real window, or the direction (1, 0, 0) in a row without any: zero vectors
  # are off the sphere and would give NaN gradients through normalisation, and NaN errors
  # that a mask multiplies by 0, even though the mask drops them.
  x = np.zeros((rows, length, *first.x.shape[1:]), np.float32)
  y = np.zeros((rows, length, *first.y.shape[1:]), np.float32)
  x[..., 0] = y[..., 0] = 1.0
  mask = np.zeros((rows, length), bool)
  for i, w in enumerate(per_client):
    x[i, : len(w)], y[i, : len(w)], mask[i, : len(w)] = w.x, w.y, True
    if len(w):
      x[i, len(w) :], y[i, len(w) :] = w.x[0], w.y[0]
  return x, y, mask


def build_client_data(
  traces: TraceSet,
  spec: DatasetSpec,
  users: Sequence[str],
  split: str = "video",
  seed: int = 0,
  validation_fraction: float = 0.0,
  first: int | None = None,
) -> ClientData:
  """Windows every viewer in ``users`` and stacks them into device arrays.

  Args:
    traces: the dataset.
    spec: gives the window shape (M, H).
    users: the clients, in order; client i is ``users[i]``.
    split: ``"video"`` or ``"time"`` (see :mod:`fedvp_jax.data.windows`).
    seed: seeds the video split of a dataset without split files, and the validation videos.
    validation_fraction: the share of each client's training traces held out to validate.
    first: the earliest window time (see :func:`~fedvp_jax.data.windows.make_windows`).
  """
  parts = [
    viewer_windows(traces, u, spec.history, spec.horizon, split, seed, validation_fraction, first)
    for u in users
  ]
  train, validation, test = (stack_windows([p[i] for p in parts]) for i in range(3))
  return ClientData.of(train, validation, test)


def client_keys(key: jax.Array, num_clients: int) -> jax.Array:
  """``key[K]``, one key per client: ``split(key, K)`` of one key, or ``key`` itself when it
  already holds the K clients' keys. A deployed client (:mod:`fedvp_jax.flower`) gets its row of
  the split the simulation makes, so it draws what it would have drawn there."""
  if key.ndim == 1:
    return key
  return jax.random.split(key, num_clients)


def sample_indices(key: jax.Array, mask: jax.Array, num_steps: int, batch_size: int) -> jax.Array:
  """``i32[K, S, B]`` window indices of every step's minibatch for clients with ``mask:
  bool[K, n]``; ``key`` is one key or every client's (see :func:`client_keys`).

  Each client walks through a fresh random permutation of its real windows, wrapping around
  when ``num_steps * batch_size`` exceeds its count, so a batch never holds padding and,
  within one pass over its data, no window twice (like a shuffled data loader). A client's draw
  does not depend on how far it is padded (threefry's bits are a prefix of a longer draw's), so
  a client alone with its own windows draws the same batches as in the padded stack.
  """
  keys = client_keys(key, mask.shape[0])
  flat = jnp.arange(num_steps * batch_size)

  def client_indices(key: jax.Array, mask: jax.Array) -> jax.Array:
    # Padding sorts after every real window, so the first `count` entries are a permutation.
    order = jnp.argsort(jnp.where(mask, jax.random.uniform(key, mask.shape), 2.0))
    count = jnp.maximum(mask.sum(), 1)
    return order[flat % count].reshape(num_steps, batch_size)

  return jax.vmap(client_indices)(keys, mask)


def sample_batches(
  key: jax.Array,
  data: ClientData,
  num_steps: int,
  batch_size: int,
  clients: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Draws every step's minibatch of every client at once, by index, on device.

  See :func:`sample_indices` for how windows are drawn.

  Args:
    key: PRNG key, or ``key[K]`` every client's (:func:`client_keys`); the same key gives the
      same batches.
    data: the clients' windows.
    num_steps: local steps S.
    batch_size: windows per step B.
    clients: ``i32[K]`` indices of the clients to draw for; all clients when ``None``.

  Returns:
    ``x: f32[K, S, B, M, 3]`` and ``y: f32[K, S, B, H, 3]``.
  """
  if clients is None:
    clients = jnp.arange(data.num_clients)
  idx = sample_indices(key, data.train_mask[clients], num_steps, batch_size)
  rows = clients[:, None, None]
  return data.train_x[rows, idx], data.train_y[rows, idx]


def sample_final_targets(
  key: jax.Array, data: ClientData, num_steps: int, batch_size: int, clients: jax.Array
) -> jax.Array:
  """``f32[K, S, B, 3]``: every step's batch of the clients' own final targets (position H),
  drawn like :func:`sample_batches` (FedGen's clients sample labels they have)."""
  idx = sample_indices(key, data.train_mask[clients], num_steps, batch_size)
  return data.train_y[clients[:, None, None], idx, -1]
