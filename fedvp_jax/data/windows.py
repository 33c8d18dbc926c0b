"""Cutting traces into (history, future) windows, and splitting them into train and test.

A window at time t of a trace ``p[0..T-1]`` has inputs ``p[t-M+1 .. t]`` (M samples, the last
observed position is ``p[t]``) and targets ``p[t+1 .. t+H]`` (H samples, 0.2 s apart, so target
k is ``0.2 * k`` seconds ahead). Valid times are ``M-1 <= t <= T-H-1``: a trace of T samples
gives ``T - M - H + 1`` windows.

Two train/test splits of each viewer's windows:

* ``video``: a viewer trains on its traces of the train videos and is tested on its traces of
  the test videos. The videos come from the dataset's split files (the user column there
  defines the separate cross-user protocol and excludes nobody here). A dataset without split
  files gets a seeded split: ``round(VIDEO_TEST_FRACTION * videos)`` test videos (at least
  one), the rest train — one third, like David's 10 train / 5 test videos.
* ``time``: the first ``TIME_TRAIN_FRACTION`` of every trace trains, the rest tests; a window
  lies wholly on one side of the cut (no input or target crosses it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedvp_jax.data.traces import TraceSet
from fedvp_jax.errors import DataError

SPLITS = ("video", "time")
VIDEO_TEST_FRACTION = 1 / 3
TIME_TRAIN_FRACTION = 0.8


@dataclasses.dataclass(frozen=True)
class Windows:
  """Windows of one viewer (or any group of traces), in host memory.

  Attributes:
    x: ``f32[n, M, 3]`` past unit vectors, oldest first.
    y: ``f32[n, H, 3]`` future unit vectors, nearest first.
  """

  x: np.ndarray
  y: np.ndarray

  def __len__(self) -> int:
    return len(self.x)

  @staticmethod
  def concatenate(parts: list[Windows], history: int, horizon: int) -> Windows:
    """Joins windows; an empty list gives zero windows of the given shape."""
    if not parts:
      return Windows(np.zeros((0, history, 3), np.float32), np.zeros((0, horizon, 3), np.float32))
    return Windows(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def make_windows(
  trace: np.ndarray,
  history: int,
  horizon: int,
  *,
  first: int | None = None,
  stop: int | None = None,
) -> Windows:
  """All windows of one trace whose samples lie in ``[0, stop)``.

  Args:
    trace: ``f32[T, 3]`` unit vectors.
    history: M.
    horizon: H.
    first: the earliest window time t (last observed sample); default ``M - 1``. The
      published evaluation protocol starts at ``t = 30``.
    stop: samples at or after ``stop`` are not used; default ``T``.

  Returns:
    Windows with times ``t`` from ``max(first, M - 1)`` up to ``stop - H - 1``; possibly none.
  """
  stop = len(trace) if stop is None else stop
  lo = history - 1 if first is None else max(first, history - 1)
  hi = stop - horizon  # one past the last valid t
  if hi <= lo:
    return Windows.concatenate([], history, horizon)
  spans = np.lib.stride_tricks.sliding_window_view(trace[:stop], history + horizon, axis=0)
  spans = np.moveaxis(spans, -1, 1)[lo - history + 1 : hi - history + 1]  # [n, M+H, 3]
  return Windows(np.ascontiguousarray(spans[:, :history]), np.ascontiguousarray(spans[:, history:]))


def split_videos(traces: TraceSet, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Train and test videos: from the split files, else a seeded split (see module doc)."""
  if traces.split is not None:
    train = {v for _, v in traces.split["train"]}
    test = {v for _, v in traces.split["test"]}
    shared = sorted(train & test)
    if shared:
      raise DataError(
        f"dataset {traces.name}: its split files train_set and test_set both name video(s) "
        f"{', '.join(shared)}; the video split would test viewers on traces they trained on"
      )
    return tuple(v for v in traces.videos if v in train), tuple(
      v for v in traces.videos if v in test
    )
  if len(traces.videos) < 2:
    raise DataError(
      f"dataset {traces.name}: the video split needs at least 2 videos, it has "
      f"{len(traces.videos)}; use the time split"
    )
  num_test = min(len(traces.videos) - 1, max(1, round(VIDEO_TEST_FRACTION * len(traces.videos))))
  order = np.random.default_rng(seed).permutation(len(traces.videos))
  test = {traces.videos[i] for i in order[:num_test]}
  return tuple(v for v in traces.videos if v not in test), tuple(
    v for v in traces.videos if v in test
  )


def viewer_windows(
  traces: TraceSet, user: str, history: int, horizon: int, split: str, seed: int = 0
) -> tuple[Windows, Windows]:
  """One viewer's train and test windows under the ``video`` or ``time`` split.

  Raises:
    DataError: for an unknown split, a trace too short for one window, or a viewer left
      with no train or no test windows.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
  train_parts: list[Windows] = []
  test_parts: list[Windows] = []
  if split == "video":
    train_videos, test_videos = split_videos(traces, seed)
    for videos, parts in ((train_videos, train_parts), (test_videos, test_parts)):
      for video in videos:
        trace = traces.traces.get((video, user))
        if trace is not None:
          _check_length(traces, video, user, len(trace), history + horizon)
          parts.append(make_windows(trace, history, horizon))
  else:
    for video in traces.videos_of(user):
      trace = traces.traces[(video, user)]
      cut = int(TIME_TRAIN_FRACTION * len(trace))
      _check_length(traces, video, user, min(cut, len(trace) - cut), history + horizon)
      train_parts.append(make_windows(trace, history, horizon, stop=cut))
      test_parts.append(make_windows(trace[cut:], history, horizon))
  train = Windows.concatenate(train_parts, history, horizon)
  test = Windows.concatenate(test_parts, history, horizon)
  for name, windows in (("train", train), ("test", test)):
    if len(windows) == 0:
      raise DataError(
        f"dataset {traces.name}: user {user!r} has no {name} windows under the {split} "
        "split (no traces of those videos)"
      )
  return train, test


def _check_length(traces: TraceSet, video: str, user: str, length: int, needed: int) -> None:
  if length < needed:
    raise DataError(
      f"dataset {traces.name}, video {video!r}, user {user!r}: the trace has {length} usable "
      f"samples, too short for one window of M+H = {needed} samples"
    )
