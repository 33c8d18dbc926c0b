"""Cutting traces into (history, future) windows, and splitting them into train, validation
and test.

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

A validation split is then carved out of each viewer's training traces, for model selection
and early stopping (the test windows serve the report only). It mirrors the test split: under
the ``video`` split a viewer with two or more training videos holds out
``round(fraction * videos)`` of them (at least one, never all), drawn with the seed and the
viewer's name; otherwise (one training video, or the ``time`` split) the last ``fraction`` of
every training trace validates, again with no window crossing the cut.
"""

from __future__ import annotations

import dataclasses
import zlib

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
  traces: TraceSet,
  user: str,
  history: int,
  horizon: int,
  split: str,
  seed: int = 0,
  validation_fraction: float = 0.0,
  first: int | None = None,
) -> tuple[Windows, Windows, Windows]:
  """One viewer's train, validation and test windows (see the module doc for the splits).

  Args:
    traces: the dataset.
    user: the viewer.
    history: M.
    horizon: H.
    split: ``"video"`` or ``"time"``.
    seed: seeds the video split of a dataset without split files and the validation videos.
    validation_fraction: the share of the training traces that validates; 0 for none (the
      validation windows are then empty).
    first: the earliest window time t (:func:`make_windows`).

  Raises:
    DataError: for an unknown split, a trace too short for one window, or a viewer left
      with no train, validation or test windows.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
  train_traces: list[tuple[str, np.ndarray]] = []
  test_parts: list[Windows] = []
  if split == "video":
    train_videos, test_videos = split_videos(traces, seed)
    for video in train_videos:
      trace = traces.traces.get((video, user))
      if trace is not None:
        _check_length(traces, video, user, len(trace), history + horizon)
        train_traces.append((video, trace))
    for video in test_videos:
      trace = traces.traces.get((video, user))
      if trace is not None:
        _check_length(traces, video, user, len(trace), history + horizon)
        test_parts.append(make_windows(trace, history, horizon, first=first))
  else:
    for video in traces.videos_of(user):
      trace = traces.traces[(video, user)]
      cut = int(TIME_TRAIN_FRACTION * len(trace))
      _check_length(traces, video, user, min(cut, len(trace) - cut), history + horizon)
      train_traces.append((video, trace[:cut]))
      test_parts.append(make_windows(trace[cut:], history, horizon))
  train_parts, validation_parts = _hold_out(
    train_traces, user, history, horizon, split, seed, validation_fraction, first
  )
  windows = {
    name: Windows.concatenate(parts, history, horizon)
    for name, parts in (
      ("train", train_parts),
      ("validation", validation_parts),
      ("test", test_parts),
    )
  }
  for name, part in windows.items():
    if len(part) == 0 and (name != "validation" or validation_fraction > 0):
      hint = "" if name != "validation" else "; lower validation_fraction, or set it to 0"
      raise DataError(
        f"dataset {traces.name}: user {user!r} has no {name} windows under the {split} "
        f"split (no traces of those videos, or too short){hint}"
      )
  return windows["train"], windows["validation"], windows["test"]


def _hold_out(
  train_traces: list[tuple[str, np.ndarray]],
  user: str,
  history: int,
  horizon: int,
  split: str,
  seed: int,
  fraction: float,
  first: int | None,
) -> tuple[list[Windows], list[Windows]]:
  """Train and validation windows of one viewer's training traces (see the module doc)."""
  if fraction <= 0:
    return [make_windows(t, history, horizon, first=first) for _, t in train_traces], []
  if split == "video" and len(train_traces) >= 2:
    count = min(len(train_traces) - 1, max(1, round(fraction * len(train_traces))))
    # The viewer's name joins the seed so that viewers hold out different videos, and the
    # choice does not change when other viewers join the run.
    rng = np.random.default_rng([seed, zlib.crc32(user.encode())])
    held = set(rng.permutation(len(train_traces))[:count].tolist())
    parts = [make_windows(t, history, horizon, first=first) for _, t in train_traces]
    return (
      [p for i, p in enumerate(parts) if i not in held],
      [p for i, p in enumerate(parts) if i in held],
    )
  train, validation = [], []
  for _, trace in train_traces:
    cut = int((1 - fraction) * len(trace))
    train.append(make_windows(trace, history, horizon, first=first, stop=cut))
    # Validation windows start after the cut: their inputs never reach back into training.
    validation.append(make_windows(trace[cut:], history, horizon))
  return train, validation


def _check_length(traces: TraceSet, video: str, user: str, length: int, needed: int) -> None:
  if length < needed:
    raise DataError(
      f"dataset {traces.name}, video {video!r}, user {user!r}: the trace has {length} usable "
      f"samples, too short for one window of M+H = {needed} samples"
    )
