"""Tests of windowing and of the video and time train/test splits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import smooth_trace, write_dataset

from fedvp_jax.data.traces import TraceSet, load_trace_dir
from fedvp_jax.data.windows import Windows, make_windows, split_videos, viewer_windows
from fedvp_jax.errors import DataError


def reference_windows(trace, m, h, first=None, stop=None):
  """Plain-loop windows: t is the last observed sample, x = p[t-m+1..t], y = p[t+1..t+h]."""
  stop = len(trace) if stop is None else stop
  start = m - 1 if first is None else max(first, m - 1)
  xs, ys = [], []
  t = start
  while t + h < stop:
    xs.append([trace[t - m + 1 + i] for i in range(m)])
    ys.append([trace[t + 1 + k] for k in range(h)])
    t += 1
  xs = np.array(xs, np.float32).reshape(len(xs), m, 3)
  ys = np.array(ys, np.float32).reshape(len(ys), h, 3)
  return xs, ys


# Distinguishable samples: sample i of video j sits at longitude i * STEP, latitude j * STEP,
# so every sample of a window can be traced back to its video and index.
STEP = 0.01


def coded_trace(video_index: int, length: int) -> np.ndarray:
  lon = np.arange(length) * STEP
  lat = np.full(length, video_index * STEP)
  return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1).astype(
    np.float32
  )


def decode(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(video index, sample index) of coded vectors ``[..., 3]``."""
  lon = np.arctan2(v[..., 1], v[..., 0])
  lat = np.arcsin(np.clip(v[..., 2], -1, 1))
  return np.rint(lat / STEP).astype(int), np.rint(lon / STEP).astype(int)


def window_ids(w: Windows) -> list[tuple[int, tuple[int, ...]]]:
  """(video, sample indices of inputs then targets) of every window."""
  vx, ix = decode(w.x)
  vy, iy = decode(w.y)
  out = []
  for n in range(len(w)):
    videos = set(vx[n]) | set(vy[n])
    assert len(videos) == 1, "a window mixes videos"
    out.append((int(vx[n, 0]), tuple(ix[n]) + tuple(iy[n])))
  return out


def coded_set(lengths: dict[tuple[str, str], int], split=None, name="Coded") -> TraceSet:
  videos = tuple(sorted({v for v, _ in lengths}, key=lambda s: int(s.split("_")[0])))
  users = tuple(sorted({u for _, u in lengths}, key=int))
  traces = {(v, u): coded_trace(videos.index(v), n) for (v, u), n in lengths.items()}
  return TraceSet(name, videos, users, traces, split)


# --- make_windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("m, h", [(1, 1), (1, 5), (5, 1), (4, 3), (10, 1), (5, 25), (12, 12)])
def test_make_windows_matches_loop(m, h):
  trace = smooth_trace(np.random.default_rng(m * 100 + h), 37).astype(np.float32)
  w = make_windows(trace, m, h)
  xs, ys = reference_windows(trace, m, h)
  assert len(w) == 37 - m - h + 1
  assert w.x.shape == (37 - m - h + 1, m, 3) and w.y.shape == (37 - m - h + 1, h, 3)
  assert w.x.dtype == np.float32 and w.y.dtype == np.float32
  np.testing.assert_array_equal(w.x, xs)
  np.testing.assert_array_equal(w.y, ys)


@pytest.mark.parametrize(
  "m, h, first, stop",
  [
    (5, 25, 30, None),
    (5, 3, 0, None),  # first below M-1 is raised to M-1
    (3, 2, 10, 30),
    (3, 2, None, 20),
    (4, 4, 30, 38),  # exactly one window
    (4, 4, 31, 38),  # none
    (6, 6, None, 11),  # stop too early for any window
    (2, 1, 39, None),  # first past the end: none
  ],
)
def test_make_windows_first_and_stop(m, h, first, stop):
  trace = smooth_trace(np.random.default_rng(7), 40).astype(np.float32)
  w = make_windows(trace, m, h, first=first, stop=stop)
  xs, ys = reference_windows(trace, m, h, first, stop)
  expected = max(0, (40 if stop is None else stop) - h - max(m - 1, first or 0))
  assert len(w) == len(xs) == expected
  assert w.x.shape == (expected, m, 3) and w.y.shape == (expected, h, 3)
  np.testing.assert_array_equal(w.x, xs)
  np.testing.assert_array_equal(w.y, ys)


def test_make_windows_indices():
  w = make_windows(coded_trace(0, 12), 3, 2, first=4, stop=10)
  ids = [ix for _, ix in window_ids(w)]
  assert ids == [(t - 2, t - 1, t, t + 1, t + 2) for t in range(4, 8)]


def test_make_windows_too_short_gives_empty():
  w = make_windows(coded_trace(0, 4), 3, 2)
  assert len(w) == 0 and w.x.shape == (0, 3, 3) and w.y.shape == (0, 2, 3)


def test_concatenate_empty():
  w = Windows.concatenate([], 4, 2)
  assert w.x.shape == (0, 4, 3) and w.y.shape == (0, 2, 3)


# --- time split ------------------------------------------------------------------------------


@pytest.mark.parametrize("length, m, h", [(50, 3, 2), (100, 10, 1), (37, 2, 3), (60, 5, 5)])
def test_time_split_never_crosses_the_cut(length, m, h):
  ts = coded_set(
    {("1_a", "0"): length, ("2_b", "0"): length, ("3_c", "0"): length, ("2_b", "1"): 9}
  )
  train, _, test = viewer_windows(ts, "0", m, h, "time")
  cut = length * 4 // 5
  span = m + h
  expected_train = {
    (j, tuple(range(s, s + span))) for j in range(3) for s in range(0, cut - span + 1)
  }
  expected_test = {
    (j, tuple(range(s, s + span))) for j in range(3) for s in range(cut, length - span + 1)
  }
  got_train, got_test = window_ids(train), window_ids(test)
  assert len(got_train) == len(set(got_train)) == 3 * (cut - span + 1)
  assert len(got_test) == len(set(got_test)) == 3 * (length - cut - span + 1)
  assert set(got_train) == expected_train
  assert set(got_test) == expected_test
  assert all(max(ix) < cut for _, ix in got_train)
  assert all(min(ix) >= cut for _, ix in got_test)


def test_time_split_with_short_test_part_is_an_error():
  # 20 samples: cut at 16, so the test part has 4 samples, fewer than M + H = 5.
  ts = coded_set({("1_a", "0"): 20, ("2_b", "0"): 50})
  with pytest.raises(DataError, match=r"dataset Coded, video .1_a., user .0.: .*too short"):
    viewer_windows(ts, "0", 3, 2, "time")


# --- video split -----------------------------------------------------------------------------


def test_video_split_uses_split_files(tmp_path):
  folder = write_dataset(
    tmp_path, videos=4, users=3, length=30, split=(["1_video", "3_video"], ["4_video"])
  )
  # The user column of the split files names only user 0; it excludes nobody.
  for file, vids in (("train_set", ["1_video", "3_video"]), ("test_set", ["4_video"])):
    (folder / file).write_text("user,video\n" + "".join(f"0,{v}\n" for v in vids))
  ts = load_trace_dir(folder)
  assert split_videos(ts, seed=0) == (("1_video", "3_video"), ("4_video",))
  assert split_videos(ts, seed=5) == (("1_video", "3_video"), ("4_video",))
  m, h = 4, 2
  for user in ts.users:
    train, _, test = viewer_windows(ts, user, m, h, "video")
    parts = [reference_windows(ts.traces[v, user], m, h) for v in ("1_video", "3_video")]
    np.testing.assert_array_equal(train.x, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(train.y, np.concatenate([p[1] for p in parts]))
    tx, ty = reference_windows(ts.traces["4_video", user], m, h)
    np.testing.assert_array_equal(test.x, tx)
    np.testing.assert_array_equal(test.y, ty)
    assert len(train) == 2 * (30 - m - h + 1) and len(test) == 30 - m - h + 1


def test_video_split_tiny(tiny_root):
  ts = load_trace_dir(tiny_root / "Tiny")
  for user in ts.users:
    train, _, test = viewer_windows(ts, user, 3, 2, "video")
    assert len(train) == 2 * 36 and len(test) == 36


def test_video_split_skips_missing_traces():
  split = {"train": (("0", "1_a"), ("0", "2_b")), "test": (("0", "3_c"),)}
  ts = coded_set(
    {("1_a", "0"): 20, ("2_b", "0"): 20, ("3_c", "0"): 20, ("1_a", "1"): 15, ("3_c", "1"): 12},
    split,
  )
  train, _, test = viewer_windows(ts, "1", 3, 1, "video")
  assert {v for v, _ in window_ids(train)} == {0}
  assert {v for v, _ in window_ids(test)} == {2}
  assert len(train) == 15 - 3 and len(test) == 12 - 3


def test_user_without_test_traces_is_an_error():
  split = {"train": (("0", "1_a"),), "test": (("0", "2_b"),)}
  ts = coded_set({("1_a", "0"): 20, ("2_b", "0"): 20, ("1_a", "1"): 20}, split)
  with pytest.raises(DataError, match=r"user '1' has no test windows"):
    viewer_windows(ts, "1", 3, 1, "video")


@pytest.mark.parametrize("num_videos", [2, 3, 4, 5, 6, 7, 9, 19])
def test_seeded_video_split_without_split_files(num_videos):
  ts = coded_set({(f"{j + 1}_v", "0"): 10 for j in range(num_videos)})
  expected_test = max(1, round(num_videos / 3))
  splits = set()
  for seed in range(8):
    train, test = split_videos(ts, seed)
    assert split_videos(ts, seed) == (train, test)
    assert len(test) == expected_test
    assert set(train) | set(test) == set(ts.videos) and not set(train) & set(test)
    assert list(train) == [v for v in ts.videos if v in train]  # natural order kept
    assert list(test) == [v for v in ts.videos if v in test]
    splits.add(test)
  assert len(splits) > 1  # the seed matters


def test_seeded_video_split_from_files(tmp_path):
  folder = write_dataset(tmp_path, videos=6, users=2, length=12)
  ts = load_trace_dir(folder)
  assert ts.split is None
  train_videos, test_videos = split_videos(ts, seed=11)
  assert len(test_videos) == 2 and len(train_videos) == 4
  for user in ts.users:
    train, _, test = viewer_windows(ts, user, 2, 1, "video", seed=11)
    again = viewer_windows(ts, user, 2, 1, "video", seed=11)
    np.testing.assert_array_equal(train.x, again[0].x)
    np.testing.assert_array_equal(test.y, again[2].y)
    ref_train = [reference_windows(ts.traces[v, user], 2, 1) for v in train_videos]
    ref_test = [reference_windows(ts.traces[v, user], 2, 1) for v in test_videos]
    np.testing.assert_array_equal(train.x, np.concatenate([r[0] for r in ref_train]))
    np.testing.assert_array_equal(test.y, np.concatenate([r[1] for r in ref_test]))


def test_video_split_needs_two_videos():
  ts = coded_set({("1_a", "0"): 20})
  with pytest.raises(DataError, match="at least 2 videos"):
    viewer_windows(ts, "0", 3, 1, "video")


def test_too_short_trace_names_dataset_video_user():
  split = {"train": (("4", "1_a"),), "test": (("4", "2_b"),)}
  ts = coded_set({("1_a", "4"): 20, ("2_b", "4"): 7}, split, name="Short_DS")
  with pytest.raises(DataError) as info:
    viewer_windows(ts, "4", 5, 3, "video")
  message = str(info.value)
  assert "Short_DS" in message and "'2_b'" in message and "'4'" in message
  assert "7" in message and "8" in message  # what it has and what it needs


def test_unknown_split():
  ts = coded_set({("1_a", "0"): 20, ("2_b", "0"): 20})
  with pytest.raises(DataError, match=r"unknown split 'user'.*video.*time"):
    viewer_windows(ts, "0", 3, 1, "user")


def test_split_files_sharing_a_video_are_rejected():
  split = {"train": (("4", "1_a"), ("4", "2_b")), "test": (("4", "2_b"),)}
  ts = coded_set({("1_a", "4"): 20, ("2_b", "4"): 20}, split, name="Leaky")
  with pytest.raises(DataError, match=r"Leaky.*train_set and test_set both name video\(s\) 2_b"):
    viewer_windows(ts, "4", 5, 3, "video")


# --- the validation split --------------------------------------------------------------------


def _samples(w: Windows) -> set[tuple[int, int]]:
  """Every (video, sample index) a set of windows touches, inputs and targets."""
  return {(v, i) for v, ids in window_ids(w) for i in ids}


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_validation_by_video_shares_no_video_with_train_or_test(fraction):
  lengths = {(f"{j + 1}_v", "0"): 25 for j in range(9)}
  ts = coded_set(lengths)
  train, validation, test = viewer_windows(
    ts, "0", 3, 2, "video", seed=4, validation_fraction=fraction
  )
  videos = [{v for v, _ in window_ids(w)} for w in (train, validation, test)]
  assert not videos[0] & videos[1] and not videos[1] & videos[2] and not videos[0] & videos[2]
  train_videos, _ = split_videos(ts, seed=4)
  assert len(videos[1]) == min(len(train_videos) - 1, max(1, round(fraction * len(train_videos))))
  assert videos[0] | videos[1] == {ts.videos.index(v) for v in train_videos}
  # Without validation the same viewer trains on every training video.
  whole, empty, same_test = viewer_windows(ts, "0", 3, 2, "video", seed=4)
  assert len(empty) == 0 and len(whole) == len(train) + len(validation)
  np.testing.assert_array_equal(same_test.x, test.x)


@pytest.mark.parametrize("split", ["video", "time"])
def test_validation_by_time_shares_no_sample_with_train(split):
  # One training video under the video split (2 videos, 1 tests) validates by time, as does
  # the time split.
  ts = coded_set({("1_a", "0"): 60, ("2_b", "0"): 60})
  train, validation, test = viewer_windows(ts, "0", 4, 3, split, seed=1, validation_fraction=0.25)
  assert len(train) and len(validation) and len(test)
  assert not _samples(train) & _samples(validation)
  assert not _samples(validation) & _samples(test)
  for video in {v for v, _ in window_ids(validation)}:
    # Validation comes after training in time: the end of each training trace.
    last_train = max(i for v, i in _samples(train) if v == video)
    first_validation = min(i for v, i in _samples(validation) if v == video)
    assert first_validation > last_train


def test_validation_differs_between_viewers_but_not_between_calls():
  ts = coded_set({(f"{j + 1}_v", u): 20 for j in range(9) for u in ("0", "1", "2", "3")})
  held = []
  for user in ts.users:
    _, validation, _ = viewer_windows(ts, user, 3, 1, "video", seed=2, validation_fraction=0.2)
    again = viewer_windows(ts, user, 3, 1, "video", seed=2, validation_fraction=0.2)[1]
    np.testing.assert_array_equal(validation.x, again.x)
    held.append(frozenset(v for v, _ in window_ids(validation)))
  assert len(set(held)) > 1


def test_too_short_for_validation_is_a_clear_error():
  ts = coded_set({("1_a", "0"): 12, ("2_b", "0"): 12})
  with pytest.raises(DataError, match=r"no validation windows.*validation_fraction"):
    viewer_windows(ts, "0", 4, 3, "video", seed=1, validation_fraction=0.2)
