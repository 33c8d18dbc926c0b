"""Tests of the built-in Synthetic dataset: its shape, determinism, split, argument checks, and
that its motion is realistic (calibrated against David_MMSys_18), shared per video, non-IID per
viewer and learnable."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedvp_jax.data.synthetic import synthetic_traces
from fedvp_jax.data.traces import TraceSet, load_trace_dir, natural_key
from fedvp_jax.errors import DataError

# Statistics of David_MMSys_18 (all 1083 traces), checked by test_david_reference_statistics
# when the real traces are present, with the tolerance the synthetic data must meet.
DAVID = {
  "mean_step": (6.78, 0.7),
  "median_step": (5.22, 1.0),
  "p90_step": (14.66, 2.5),
  "frac_step_below_1": (0.143, 0.05),
  "frac_step_above_20": (0.040, 0.02),
  "lat_std": (19.88, 3.0),
  "median_abs_lat": (8.31, 3.0),
}
DAVID_DIR = "David_MMSys_18"


def as_array(ts: TraceSet) -> np.ndarray:
  """``f64[V, U, T, 3]`` traces, videos and users in the set's order."""
  return np.stack([[ts.traces[v, u] for u in ts.users] for v in ts.videos]).astype(np.float64)


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Great-circle angle in degrees between unit vectors."""
  cross = np.linalg.norm(np.cross(a, b), axis=-1)
  return np.degrees(np.arctan2(cross, np.sum(a * b, axis=-1)))


def motion_statistics(traces: np.ndarray) -> dict[str, float]:
  """The statistics of ``DAVID`` for traces ``f[..., T, 3]``."""
  steps = angle_deg(traces[..., 1:, :], traces[..., :-1, :]).ravel()
  lat = np.degrees(np.arcsin(np.clip(traces[..., 2], -1.0, 1.0))).ravel()
  return {
    "mean_step": steps.mean(),
    "median_step": np.median(steps),
    "p90_step": np.percentile(steps, 90),
    "frac_step_below_1": np.mean(steps < 1.0),
    "frac_step_above_20": np.mean(steps > 20.0),
    "lat_std": lat.std(),
    "median_abs_lat": np.median(np.abs(lat)),
  }


def anova_f(values: np.ndarray) -> float:
  """One-way ANOVA F statistic of ``values: f[V, U]`` grouped by the user axis."""
  num_videos, num_users = values.shape
  user_means = values.mean(axis=0)
  between = num_videos * np.sum((user_means - values.mean()) ** 2) / (num_users - 1)
  within = np.sum((values - user_means) ** 2) / (num_users * (num_videos - 1))
  return between / within


def test_shapes_names_and_unit_vectors():
  ts = synthetic_traces()
  assert ts.name == "Synthetic"
  assert ts.videos == tuple(f"{i}_synthetic" for i in range(1, 13))
  assert ts.users == tuple(str(i) for i in range(24))
  assert list(ts.videos) == sorted(ts.videos, key=natural_key)
  assert list(ts.users) == sorted(ts.users, key=natural_key)
  assert set(ts.traces) == {(v, u) for v in ts.videos for u in ts.users}
  for trace in ts.traces.values():
    assert trace.dtype == np.float32
    assert trace.shape == (100, 3)
    assert np.all(np.isfinite(trace))
    np.testing.assert_allclose(np.linalg.norm(trace, axis=-1), 1.0, atol=1e-5)


def test_custom_sizes():
  ts = synthetic_traces(num_users=1, num_videos=2, num_samples=2, seed=3)
  assert ts.videos == ("1_synthetic", "2_synthetic")
  assert ts.users == ("0",)
  assert [t.shape for t in ts.traces.values()] == [(2, 3), (2, 3)]
  assert ts.split == {"train": (("0", "1_synthetic"),), "test": (("0", "2_synthetic"),)}


def test_same_seed_same_traces_and_different_seeds_differ():
  a, b, c = synthetic_traces(seed=7), synthetic_traces(seed=7), synthetic_traces(seed=8)
  np.testing.assert_array_equal(as_array(a), as_array(b))
  assert a.split == b.split
  # Every trace differs, and by a lot, not only in the last digits.
  assert np.all(angle_deg(as_array(a), as_array(c)).mean(axis=-1) > 1.0)


@pytest.mark.parametrize("num_videos", [2, 3, 4, 5, 6, 7, 12])
def test_split_has_every_user_on_both_sides_and_disjoint_videos(num_videos):
  ts = synthetic_traces(num_users=3, num_videos=num_videos, num_samples=5)
  train_videos = {v for _, v in ts.split["train"]}
  test_videos = {v for _, v in ts.split["test"]}
  assert len(train_videos) == round(2 * num_videos / 3)
  assert train_videos.isdisjoint(test_videos)
  assert train_videos | test_videos == set(ts.videos)
  # The first videos train, the last ones test.
  last_train = max(ts.videos.index(v) for v in train_videos)
  assert last_train < min(ts.videos.index(v) for v in test_videos)
  for side in ("train", "test"):
    pairs = ts.split[side]
    assert len(pairs) == len(set(pairs))
    assert {u for u, _ in pairs} == set(ts.users)
    videos = train_videos if side == "train" else test_videos
    assert set(pairs) == {(u, v) for v in videos for u in ts.users}


@pytest.mark.parametrize(
  ("kwargs", "arg"),
  [
    ({"num_users": 0}, "num_users"),
    ({"num_users": -3}, "num_users"),
    ({"num_users": 2.0}, "num_users"),
    ({"num_users": True}, "num_users"),
    ({"num_videos": 1}, "num_videos"),
    ({"num_videos": "12"}, "num_videos"),
    ({"num_samples": 1}, "num_samples"),
    ({"num_samples": None}, "num_samples"),
  ],
)
def test_bad_arguments_raise_data_error_naming_the_argument(kwargs, arg):
  with pytest.raises(DataError, match=arg):
    synthetic_traces(**kwargs)


def test_generation_is_fast():
  best = np.inf
  for _ in range(3):
    start = time.perf_counter()
    synthetic_traces()
    best = min(best, time.perf_counter() - start)
  assert best < 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_motion_statistics_match_david(seed):
  stats = motion_statistics(as_array(synthetic_traces(seed=seed)))
  for name, (reference, tolerance) in DAVID.items():
    assert abs(stats[name] - reference) <= tolerance, (name, stats[name], reference)


def test_salient_regions_are_shared_by_the_viewers_of_a_video():
  traces = as_array(synthetic_traces())
  num_videos, num_users = traces.shape[:2]
  flat = traces.reshape(num_videos * num_users, *traces.shape[2:])
  # Mean distance at the same time between every two traces (arccos is accurate enough here).
  by_time = flat.transpose(1, 0, 2)
  cosines = np.clip(by_time @ by_time.transpose(0, 2, 1), -1.0, 1.0)
  dist = np.degrees(np.arccos(cosines)).mean(axis=0)
  vid = np.repeat(np.arange(num_videos), num_users)
  usr = np.tile(np.arange(num_users), num_videos)
  other_user = usr[:, None] != usr[None, :]
  same_video = dist[other_user & (vid[:, None] == vid[None, :])].mean()
  other_video = dist[other_user & (vid[:, None] != vid[None, :])].mean()
  assert same_video < other_video - 5.0, (same_video, other_video)


def test_viewers_are_non_iid():
  traces = as_array(synthetic_traces())
  mean_lat = np.degrees(np.arcsin(traces[..., 2])).mean(axis=-1)
  mean_step = angle_deg(traces[..., 1:, :], traces[..., :-1, :]).mean(axis=-1)
  # With no per-viewer effect F is about 1; 2.5 is beyond its 0.1% quantile here.
  assert anova_f(mean_lat) > 2.5
  assert anova_f(mean_step) > 2.5


def local_frames(last: np.ndarray) -> np.ndarray:
  """Rotations ``f[n, 3, 3]`` taking ``last`` to (1, 0, 0), east to +y and north to +z."""
  lon = np.arctan2(last[:, 1], last[:, 0])
  lat = np.arcsin(np.clip(last[:, 2], -1.0, 1.0))
  zero, one = np.zeros_like(lon), np.ones_like(lon)
  about_z = np.stack(
    [
      np.stack([np.cos(lon), np.sin(lon), zero], -1),
      np.stack([-np.sin(lon), np.cos(lon), zero], -1),
      np.stack([zero, zero, one], -1),
    ],
    -2,
  )
  about_y = np.stack(
    [
      np.stack([np.cos(lat), zero, np.sin(lat)], -1),
      np.stack([zero, one, zero], -1),
      np.stack([-np.sin(lat), zero, np.cos(lat)], -1),
    ],
    -2,
  )
  return about_y @ about_z


def windows(traces: np.ndarray, history: int, horizons: list[int]) -> tuple[np.ndarray, ...]:
  """Past ``f[n, history, 3]`` and futures ``f[n, len(horizons), 3]`` of ``f[..., T, 3]``."""
  traces = traces.reshape(-1, *traces.shape[-2:])
  span = history + max(horizons)
  win = np.lib.stride_tricks.sliding_window_view(traces, span, axis=1)  # [N, W, 3, span]
  win = np.moveaxis(win, -1, -2).reshape(-1, span, 3)
  return win[:, :history], win[:, [history - 1 + h for h in horizons]]


def test_learnable_beyond_repeat_last_and_constant_velocity():
  ts = synthetic_traces()
  traces = as_array(ts)
  num_train = len({v for _, v in ts.split["train"]})
  horizons = [1, 5, 10]  # 0.2 s, 1 s, 2 s
  past, future = windows(traces[:num_train], 10, horizons)
  test_past, test_future = windows(traces[num_train:], 10, horizons)

  def features(p):
    rot = local_frames(p[:, -1])
    local = np.einsum("nij,nmj->nmi", rot, p)[:, :-1, 1:]
    return rot, np.concatenate([local.reshape(len(p), -1), np.ones((len(p), 1))], axis=1)

  # A ridge-regularised linear map from the last 2 s to the future, in the head's local frame,
  # fitted on the train videos only.
  rot, x = features(past)
  y = np.einsum("nij,nhj->nhi", rot, future).reshape(len(x), -1)
  weights = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ y)
  rot, x = features(test_past)
  pred = (x @ weights).reshape(len(x), len(horizons), 3)
  pred /= np.linalg.norm(pred, axis=-1, keepdims=True)
  err_linear = angle_deg(pred, np.einsum("nij,nhj->nhi", rot, test_future)).mean(axis=0)

  err_last = angle_deg(test_past[:, -1:], test_future).mean(axis=0)
  before, last = test_past[:, -2], test_past[:, -1]
  axis = np.cross(before, last)
  axis /= np.maximum(np.linalg.norm(axis, axis=-1, keepdims=True), 1e-12)
  step = np.radians(angle_deg(before, last))
  err_velocity = []
  for i, h in enumerate(horizons):
    theta = (step * h)[:, None]
    pred = (
      last * np.cos(theta)
      + np.cross(axis, last) * np.sin(theta)
      + axis * np.sum(axis * last, axis=-1, keepdims=True) * (1 - np.cos(theta))
    )
    err_velocity.append(angle_deg(pred, test_future[:, i]).mean())
  assert np.all(err_linear < 0.95 * np.minimum(err_last, err_velocity)), (
    err_linear,
    err_last,
    err_velocity,
  )


def find_david() -> Path | None:
  roots = [os.environ.get("FEDVP_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
  for root in roots:
    if root and (Path(root) / DAVID_DIR / "sampled_dataset").is_dir():
      return Path(root) / DAVID_DIR
  return None


@pytest.mark.real_data
def test_david_reference_statistics():
  david = find_david()
  if david is None:
    pytest.skip("David_MMSys_18 traces not found (set FEDVP_DATA)")
  ts = load_trace_dir(david, use_cache=False)
  stats = motion_statistics(np.stack(list(ts.traces.values())).astype(np.float64))
  for name, (reference, _) in DAVID.items():
    assert stats[name] == pytest.approx(reference, rel=0.01, abs=0.001), name
