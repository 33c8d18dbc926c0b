"""Tests of client selection, stacked/padded client data and the jittable batch sampler."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smooth_trace

from fedvp_jax.data.datasets import DatasetSpec
from fedvp_jax.data.federated import ClientData, build_client_data, sample_batches, select_users
from fedvp_jax.data.traces import TraceSet
from fedvp_jax.data.windows import make_windows
from fedvp_jax.errors import DataError, SettingError


def user_set(num_users: int = 12, name: str = "Users") -> TraceSet:
  users = tuple(str(i) for i in range(num_users))
  rng = np.random.default_rng(0)
  traces = {("1_v", u): smooth_trace(rng, 8).astype(np.float32) for u in users}
  return TraceSet(name, ("1_v",), users, traces)


# --- select_users ----------------------------------------------------------------------------


def test_select_users_seeded_and_reproducible():
  ts = user_set(12)
  draws = set()
  for seed in range(6):
    chosen = select_users(ts, 5, seed=seed)
    assert chosen == select_users(ts, 5, seed=seed)
    assert len(chosen) == len(set(chosen)) == 5
    assert set(chosen) <= set(ts.users)
    assert list(chosen) == sorted(chosen, key=int)  # natural order
    draws.add(chosen)
  assert len(draws) > 1


def test_select_all_users():
  ts = user_set(12)
  assert select_users(ts) == ts.users
  assert select_users(ts, 12, seed=4) == ts.users


def test_select_explicit_users():
  ts = user_set(12)
  assert select_users(ts, users=["10", "2", "7"]) == ("2", "7", "10")
  assert select_users(ts, num_users=1, users=["3", "0"]) == ("0", "3")  # the list wins


def test_select_unknown_users():
  ts = user_set(12)
  with pytest.raises(DataError) as info:
    select_users(ts, users=["1", "x9", "99"])
  message = str(info.value)
  assert "'x9'" in message and "'99'" in message and "Users" in message
  assert "'1'" not in message.split("its users", maxsplit=1)[0]


@pytest.mark.parametrize("num", [13, 100, 0, -2])
def test_select_wrong_number_of_users(num):
  ts = user_set(12)
  with pytest.raises(SettingError) as info:  # a number of clients the dataset cannot serve
    select_users(ts, num)
  message = str(info.value)
  assert str(num) in message and "12 users" in message and "Users" in message


# --- build_client_data -----------------------------------------------------------------------

M, H = 3, 2
# (video, user) -> trace length. Train videos 1_a, 2_b; test video 3_c.
LENGTHS = {
  ("1_a", "0"): 20,
  ("2_b", "0"): 20,
  ("3_c", "0"): 20,
  ("1_a", "1"): 30,
  ("3_c", "1"): 25,
  ("1_a", "2"): 15,
  ("2_b", "2"): 15,
  ("3_c", "2"): 20,
}
# Windows per trace: T - M - H + 1.
TRAIN_COUNTS = {"0": 16 + 16, "1": 26, "2": 11 + 11}
TEST_COUNTS = {"0": 16, "1": 21, "2": 16}


@pytest.fixture(scope="module")
def uneven() -> TraceSet:
  rng = np.random.default_rng(1)
  traces = {k: smooth_trace(rng, n).astype(np.float32) for k, n in LENGTHS.items()}
  users = ("0", "1", "2")
  split = {
    "train": tuple((u, v) for v in ("1_a", "2_b") for u in users),
    "test": tuple((u, "3_c") for u in users),
  }
  return TraceSet("Uneven", ("1_a", "2_b", "3_c"), users, traces, split)


@pytest.mark.parametrize("order", [("0", "1", "2"), ("2", "0"), ("1",)])
def test_build_client_data_shapes_padding_and_mask(uneven, order):
  data = build_client_data(uneven, DatasetSpec("Uneven", M, H), order, split="video")
  k = len(order)
  n_train = max(TRAIN_COUNTS[u] for u in order)
  n_test = max(TEST_COUNTS[u] for u in order)
  chex.assert_shape([data.train_x], (k, n_train, M, 3))
  chex.assert_shape([data.train_y], (k, n_train, H, 3))
  chex.assert_shape([data.train_mask], (k, n_train))
  chex.assert_shape([data.test_x], (k, n_test, M, 3))
  chex.assert_shape([data.test_y], (k, n_test, H, 3))
  chex.assert_shape([data.test_mask], (k, n_test))
  chex.assert_type([data.train_x, data.train_y, data.test_x, data.test_y], jnp.float32)
  assert data.train_mask.dtype == jnp.bool_ and data.test_mask.dtype == jnp.bool_
  assert data.num_clients == k
  np.testing.assert_array_equal(data.train_counts, [TRAIN_COUNTS[u] for u in order])
  np.testing.assert_array_equal(data.test_counts, [TEST_COUNTS[u] for u in order])
  for i, u in enumerate(order):
    # Real windows first, then padding: the mask is a prefix.
    np.testing.assert_array_equal(data.train_mask[i], np.arange(n_train) < TRAIN_COUNTS[u])
    np.testing.assert_array_equal(data.test_mask[i], np.arange(n_test) < TEST_COUNTS[u])
    train = [make_windows(uneven.traces[v, u], M, H) for v in ("1_a", "2_b") if (v, u) in LENGTHS]
    test = make_windows(uneven.traces["3_c", u], M, H)
    c = TRAIN_COUNTS[u]
    np.testing.assert_array_equal(data.train_x[i, :c], np.concatenate([w.x for w in train]))
    np.testing.assert_array_equal(data.train_y[i, :c], np.concatenate([w.y for w in train]))
    np.testing.assert_array_equal(data.test_x[i, : TEST_COUNTS[u]], test.x)
    np.testing.assert_array_equal(data.test_y[i, : TEST_COUNTS[u]], test.y)
  # Padding stays on the sphere (no zero vectors that would poison a normalisation).
  for arr in (data.train_x, data.train_y, data.test_x, data.test_y):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(arr), axis=-1), 1.0, atol=1e-5)


def test_build_client_data_time_split(uneven):
  # User 1: traces of 30 and 25 samples, cut at 24 and 20: (24-5+1) + (20-5+1) train windows,
  # (6-5+1) + (5-5+1) test windows.
  data = build_client_data(uneven, DatasetSpec("Uneven", M, H), ("1",), split="time")
  np.testing.assert_array_equal(data.train_counts, [36])
  np.testing.assert_array_equal(data.test_counts, [3])
  np.testing.assert_array_equal(data.test_x[0, 0], uneven.traces["1_a", "1"][24:27])
  # User 0: traces of 20 samples leave 4 test samples, fewer than M + H = 5.
  with pytest.raises(DataError, match="dataset Uneven, video '1_a', user '0'"):
    build_client_data(uneven, DatasetSpec("Uneven", M, H), ("0", "1"), split="time")


# --- sample_batches --------------------------------------------------------------------------

COUNTS = (7, 12, 3, 5)
N = 12


def coded_client_data(counts=COUNTS, n=N) -> ClientData:
  """x[c, i] = (c, i, 1) at every history step, y[c, i] = (c, i, 2); padding is (-1, -1, -1)."""
  k = len(counts)
  mask = np.arange(n)[None, :] < np.array(counts)[:, None]
  cid = np.broadcast_to(np.arange(k)[:, None], (k, n)).astype(np.float32)
  wid = np.broadcast_to(np.arange(n)[None, :], (k, n)).astype(np.float32)
  x = np.stack([cid, wid, np.ones_like(cid)], -1)
  y = np.stack([cid, wid, 2 * np.ones_like(cid)], -1)
  x = np.where(mask[..., None], x, -1.0)[:, :, None, :].repeat(M, axis=2)
  y = np.where(mask[..., None], y, -1.0)[:, :, None, :].repeat(H, axis=2)
  return ClientData(
    jnp.asarray(x),
    jnp.asarray(y),
    jnp.asarray(mask),
    jnp.asarray(x),
    jnp.asarray(y),
    jnp.asarray(mask),
  )


sample_jit = jax.jit(sample_batches, static_argnums=(2, 3))


def decode_batches(x, y):
  """(client ids, window ids) ``int[K, S, B]`` of sampled batches, checking x and y agree."""
  x, y = np.asarray(x), np.asarray(y)
  assert (x[..., 2] == 1).all() and (y[..., 2] == 2).all(), "padding was sampled"
  assert (x[..., :1, :2] == x[..., :, :2]).all() and (y[..., :2] == x[..., :1, :2]).all()
  return x[..., 0, 0].astype(int), x[..., 0, 1].astype(int)


def test_sample_batches_shapes_and_determinism():
  data = coded_client_data()
  key = jax.random.key(0)
  x, y = sample_jit(key, data, 3, 2)
  chex.assert_shape(x, (len(COUNTS), 3, 2, M, 3))
  chex.assert_shape(y, (len(COUNTS), 3, 2, H, 3))
  x2, y2 = sample_jit(jax.random.key(0), data, 3, 2)
  chex.assert_trees_all_equal((x, y), (x2, y2))
  x3, _ = sample_jit(jax.random.key(1), data, 3, 2)
  assert not np.array_equal(np.asarray(x), np.asarray(x3))


def test_sampled_windows_are_real_windows_of_their_client():
  data = coded_client_data()
  for seed in range(5):
    x, y = sample_jit(jax.random.key(seed), data, 4, 5)  # 20 > every count: wraps
    clients, windows = decode_batches(x, y)
    for c, count in enumerate(COUNTS):
      assert (clients[c] == c).all()
      assert (windows[c] >= 0).all() and (windows[c] < count).all()


def test_no_repeats_within_one_pass():
  data = coded_client_data()
  for seed in range(5):
    x, y = sample_jit(jax.random.key(seed), data, 1, 3)  # 3 <= every count
    _, windows = decode_batches(x, y)
    for c in range(len(COUNTS)):
      assert len(set(windows[c].ravel())) == 3
  # A full pass visits every real window exactly once.
  x, y = sample_jit(jax.random.key(3), coded_client_data((12, 12, 12), 12), 4, 3)
  _, windows = decode_batches(x, y)
  for c in range(3):
    assert sorted(windows[c].ravel()) == list(range(12))


def test_wrapping_repeats_the_same_permutation():
  data = coded_client_data()
  x, y = sample_jit(jax.random.key(7), data, 6, 4)  # 24 draws
  _, windows = decode_batches(x, y)
  for c, count in enumerate(COUNTS):
    flat = windows[c].ravel()
    assert sorted(flat[:count]) == list(range(count))
    np.testing.assert_array_equal(flat, flat[np.arange(24) % count])


def test_sample_batches_under_jit_equals_eager():
  data = coded_client_data()
  key = jax.random.key(42)
  chex.assert_trees_all_equal(sample_jit(key, data, 3, 2), sample_batches(key, data, 3, 2))
  clients = jnp.array([3, 1])
  chex.assert_trees_all_equal(
    sample_jit(key, data, 2, 3, clients),
    jax.jit(lambda k, d, c: sample_batches(k, d, 2, 3, c))(key, data, clients),
  )


def test_clients_argument_selects_rows():
  data = coded_client_data()
  clients = jnp.array([2, 0, 3])
  x, y = sample_jit(jax.random.key(5), data, 2, 3, clients)
  chex.assert_shape(x, (3, 2, 3, M, 3))
  chex.assert_shape(y, (3, 2, 3, H, 3))
  ids, windows = decode_batches(x, y)
  for row, c in enumerate([2, 0, 3]):
    assert (ids[row] == c).all()
    assert (windows[row] < COUNTS[c]).all()
    if COUNTS[c] >= 6:
      assert len(set(windows[row].ravel())) == 6


def test_sampling_real_client_data(uneven):
  data = build_client_data(uneven, DatasetSpec("Uneven", M, H), ("0", "1", "2"))
  x, y = sample_jit(jax.random.key(0), data, 5, 4)
  chex.assert_shape(x, (3, 5, 4, M, 3))
  for i in range(3):
    real = np.concatenate([np.asarray(data.train_x[i]), np.asarray(data.train_y[i])], axis=1)[
      np.asarray(data.train_mask[i])
    ]
    drawn = np.concatenate([np.asarray(x[i]), np.asarray(y[i])], axis=2).reshape(-1, M + H, 3)
    for w in drawn:
      assert (np.abs(real - w).max(axis=(1, 2)) == 0).any()
