"""Reading and validating head-movement trace files, with a parsed-array cache.

The layout is the one of the head-motion-prediction community (TRACK, MMSys 2020)::

    <root>/<Dataset>/sampled_dataset/<video>/<user>   CSV rows "t_seconds,x,y,z", no header
    <root>/<Dataset>/train_set, test_set              optional CSV "user,video" with a header
                                                      (both or neither; each lists >= 1 pair)

One row every ``SAMPLE_PERIOD`` seconds; ``(x, y, z)`` is the unit head-direction vector.
Entries of ``sampled_dataset`` and of its video folders whose names start with ``.``
(``.DS_Store`` and other file-system clutter) are ignored; anything else that does not fit the
layout (a folder where a trace file belongs, a file where a video folder belongs, an empty
video folder) is a ``DataError``, never skipped.

Parsing 1083 small CSV files takes a noticeable fraction of a second, so the parsed arrays are
cached in one ``.npz`` file per dataset under ``$FEDVP_CACHE`` (default
``~/.cache/fedvp_jax``), named after the dataset folder and a hash of its resolved path. The
cache is keyed on content: its key is a BLAKE2b hash of the cache format version, the
validation rules (``SAMPLE_PERIOD``, ``UNIT_NORM_TOLERANCE``, ``TIMESTAMP_TOLERANCE``) and, for
every trace file in sorted order, its video and user names and all of its bytes.
A cache is used only when the key stored in it equals the key of the files on disk now;
otherwise the traces are parsed again and the cache rewritten. File sizes and modification
times play no part, so an edit that keeps both is still seen. Every load therefore reads every
trace file; what the cache saves is parsing and validating them (David_MMSys_18, 1083 files,
7.5 MB: about 0.7 s to load without a valid cache, 0.05 s with one, of which reading and
hashing the files take 0.03 s). Split files are not cached: they are
read and checked on every load. An unreadable cache is ignored with a warning and rewritten.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import warnings
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from fedvp_jax.errors import DataError

SAMPLE_PERIOD = 0.2
"""Seconds between two consecutive samples of a trace."""

UNIT_NORM_TOLERANCE = 0.05
"""Vectors whose norm is further than this from 1 are rejected; nearer ones are renormalised."""

TIMESTAMP_TOLERANCE = 0.01
"""Seconds by which a timestamp step may differ from ``SAMPLE_PERIOD``."""

_CACHE_VERSION = 2  # 2: keyed on file contents, not sizes and times


@dataclasses.dataclass(frozen=True)
class TraceSet:
  """Every head-movement trace of one dataset.

  Attributes:
    name: dataset name, e.g. ``"David_MMSys_18"``.
    videos: video names in natural order.
    users: user names in natural order.
    traces: ``(video, user) -> f32[T, 3]`` unit head-direction vectors, one per
      ``SAMPLE_PERIOD``. Not every user needs a trace of every video. Loaded for some viewers
      only (see :func:`load_trace_dir`), it holds only theirs.
    split: the dataset's own ``{"train": ((user, video), ...), "test": (...)}`` pairs, read
      from its split files, or ``None`` when it has none.
  """

  name: str
  videos: tuple[str, ...]
  users: tuple[str, ...]
  traces: Mapping[tuple[str, str], np.ndarray]
  split: Mapping[str, tuple[tuple[str, str], ...]] | None = None

  def videos_of(self, user: str) -> tuple[str, ...]:
    """The videos that ``user`` has a trace of, in natural order."""
    return tuple(v for v in self.videos if (v, user) in self.traces)


def natural_key(name: str) -> list[int | str]:
  """Sort key under which ``"2_Diner"`` comes before ``"10_Cows"`` and ``"9"`` before ``"10"``."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_trace_file(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads and validates one trace file.

  Args:
    path: a header-less CSV file of rows ``t_seconds,x,y,z``.

  Returns:
    ``f32[T, 3]`` unit vectors (small norm deviations renormalised).

  Raises:
    DataError: naming the file and line, for an empty file, a row without four numeric
      fields, a non-finite value, a vector far from unit length or a timestamp step that is
      not ``SAMPLE_PERIOD``.
  """
  path = Path(path)
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as err:
    raise DataError(f"{path}: cannot read trace file ({err})") from err
  rows = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split(",")
    if len(fields) != 4:
      raise DataError(
        f"{path}:{lineno}: expected 4 comma-separated fields 't_seconds,x,y,z', "
        f"got {len(fields)}: {line.strip()!r}"
      )
    try:
      values = [float(f) for f in fields]
    except ValueError:
      raise DataError(f"{path}:{lineno}: non-numeric field in {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
      raise DataError(f"{path}:{lineno}: non-finite value (NaN or inf) in {line.strip()!r}")
    rows.append((lineno, values))
  if not rows:
    raise DataError(f"{path}: trace file is empty")
  linenos = np.array([r[0] for r in rows])
  data = np.array([r[1] for r in rows], dtype=np.float64)
  norms = np.linalg.norm(data[:, 1:], axis=1)
  bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
  if bad.size:
    i = bad[0]
    raise DataError(
      f"{path}:{linenos[i]}: head direction has norm {norms[i]:.4f}; expected a unit vector "
      f"(norm within {UNIT_NORM_TOLERANCE} of 1)"
    )
  steps = np.diff(data[:, 0])
  bad = np.flatnonzero(np.abs(steps - SAMPLE_PERIOD) > TIMESTAMP_TOLERANCE)
  if bad.size:
    i = bad[0]
    raise DataError(
      f"{path}:{linenos[i + 1]}: irregular timestamp: step of {steps[i]:.4f} s from the "
      f"previous row, expected {SAMPLE_PERIOD} s"
    )
  return (data[:, 1:] / norms[:, None]).astype(np.float32)


def read_split_file(
  path: Path, traces: Mapping[tuple[str, str], object]
) -> tuple[tuple[str, str], ...]:
  """Reads a ``user,video`` split file, checking that every pair names a known trace.

  Raises:
    DataError: naming the file and line, for an unreadable file, a missing header, a row
      without two fields, a pair without a trace, a pair listed twice or a file that lists no
      pair at all.
  """
  known_videos, known_users = {v for v, _ in traces}, {u for _, u in traces}
  first_line: dict[tuple[str, str], int] = {}
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as err:
    raise DataError(f"{path}: cannot read split file ({err})") from err
  reader = csv.reader(io.StringIO(text))
  header = next(reader, None)
  if header is None:
    raise DataError(
      f"{path}:1: split file is empty: it lists no (user, video) pair (expected the header "
      "'user,video', then one 'user,video' line per pair)"
    )
  if [h.strip() for h in header] != ["user", "video"]:
    raise DataError(f"{path}:1: expected the header 'user,video', got {header!r}")
  for lineno, row in enumerate(reader, start=2):
    if not row:
      continue
    if len(row) != 2:
      raise DataError(f"{path}:{lineno}: expected 'user,video', got {','.join(row)!r}")
    user, video = row[0].strip(), row[1].strip()
    if video not in known_videos:
      raise DataError(f"{path}:{lineno}: video {video!r} has no folder in sampled_dataset")
    if user not in known_users:
      raise DataError(f"{path}:{lineno}: user {user!r} has no trace in sampled_dataset")
    if (video, user) not in traces:
      raise DataError(
        f"{path}:{lineno}: user {user!r} has no trace of video {video!r} "
        f"(no file sampled_dataset/{video}/{user})"
      )
    if (user, video) in first_line:
      raise DataError(
        f"{path}:{lineno}: user {user!r}, video {video!r} is listed twice (first on line "
        f"{first_line[user, video]})"
      )
    first_line[user, video] = lineno
  if not first_line:
    raise DataError(f"{path}: split file lists no (user, video) pair, only the header 'user,video'")
  return tuple(first_line)  # dicts keep insertion order: the pairs in file order


def load_trace_dir(
  dataset_dir: str | os.PathLike[str],
  *,
  use_cache: bool = True,
  users: Collection[str] | None = None,
  split_files: bool = True,
) -> TraceSet:
  """Loads every trace of a dataset folder, through the parsed-array cache.

  Args:
    dataset_dir: ``<root>/<Dataset>``, holding ``sampled_dataset/`` and optionally the split
      files ``train_set`` and ``test_set``.
    use_cache: read and write the parsed-array cache.
    users: read and validate only these viewers' trace files, not through the cache (one
      process of a multi-process run holds only its own clients' traces); ``videos``,
      ``users`` and ``split`` still describe the whole dataset. ``None``: every viewer's.
    split_files: read and check the split files. ``False`` leaves them unread and ``split``
      ``None``: for a folder holding one viewer's traces (a Flower client's), whose split files,
      if copied along, name pairs whose traces are elsewhere; such a client takes the dataset's
      videos and split from the server (:mod:`fedvp_jax.flower.setup`).

  Returns:
    The dataset's traces; ``split`` is set when the split files exist (both or neither must).

  Raises:
    DataError: when the folder has no ``sampled_dataset``, an entry there does not fit the
      layout (see :func:`_trace_files`) or any file is malformed.
  """
  dataset_dir = Path(dataset_dir)
  sampled = dataset_dir / "sampled_dataset"
  if not sampled.is_dir():
    raise DataError(f"{dataset_dir}: no 'sampled_dataset' folder; not a trace dataset")
  files = _trace_files(sampled)
  found_split = _split_files(dataset_dir) if split_files else {}
  traces: dict[tuple[str, str], np.ndarray] | None = None
  if users is not None:
    wanted = set(users)
    traces = {(v, u): read_trace_file(path) for v, u, path in files if u in wanted}
  else:
    fingerprint = _fingerprint(files)
    cache_path = _cache_path(dataset_dir) if use_cache else None
    traces = _read_cache(cache_path, fingerprint) if cache_path else None
    if traces is None:
      traces = {(video, user): read_trace_file(path) for video, user, path in files}
      if cache_path:
        _write_cache(cache_path, fingerprint, traces)

  pairs = dict.fromkeys((video, user) for video, user, _ in files)
  videos = tuple(sorted({v for v, _ in pairs}, key=natural_key))
  viewers = tuple(sorted({u for _, u in pairs}, key=natural_key))
  split = None
  if found_split:
    split = {name: read_split_file(path, pairs) for name, path in found_split.items()}
  return TraceSet(dataset_dir.name, videos, viewers, traces, split)


def _split_files(dataset_dir: Path) -> dict[str, Path]:
  """``{"train": train_set, "test": test_set}`` when both exist, ``{}`` when neither does.

  Raises:
    DataError: when only one exists (falling back to a seeded split would silently ignore
      it), or when one is not a file.
  """
  paths = {name: dataset_dir / f"{name}_set" for name in ("train", "test")}
  # lexists: a broken link is a split file that cannot be read, not an absent one.
  present = {name: p for name, p in paths.items() if os.path.lexists(p)}
  for p in present.values():
    if not p.is_file():
      raise DataError(f"{p}: expected a split file (CSV 'user,video'), found {_kind(p)}")
  if len(present) == 1:
    (have,) = present.values()
    (missing,) = (p for name, p in paths.items() if name not in present)
    raise DataError(
      f"{have}: split file without its partner {missing.name}; a dataset needs both "
      "train_set and test_set, or neither (then the video split is drawn with the seed)"
    )
  return present


def _trace_files(sampled: Path) -> list[tuple[str, str, Path]]:
  """``(video, user, path)`` of every trace file ``sampled_dataset/<video>/<user>``, sorted.

  Entries whose name starts with ``.`` are skipped at both levels: ``.DS_Store``, ``._*``
  AppleDouble files, editor swap files and ``.git``-like folders are file-system clutter, and
  the layout gives no video or user such a name. Any other entry that does not fit the layout
  is an error rather than skipped, because skipping it would silently drop a viewer's traces.
  Symbolic links count as what they point to.

  Raises:
    DataError: naming the entry, for a non-folder where a video folder belongs, a non-file
      (folder, broken link, device) where a trace file belongs, a video folder without trace
      files, or a ``sampled_dataset`` without any.
  """
  # os.scandir rather than Path.iterdir: its entries carry their type, which spares a stat
  # call per file on a dataset of a thousand traces.
  files = []
  for video in sorted(os.scandir(sampled), key=lambda e: e.name):
    if video.name.startswith("."):
      continue
    video_dir = Path(video.path)
    if not video.is_dir():
      raise DataError(
        f"{video_dir}: expected a video folder sampled_dataset/<video>/, found {_kind(video_dir)}"
      )
    users = [e for e in os.scandir(video_dir) if not e.name.startswith(".")]
    if not users:
      raise DataError(
        f"{video_dir}: video folder holds no trace files (expected sampled_dataset/<video>/<user>)"
      )
    for user in sorted(users, key=lambda e: e.name):
      path = video_dir / user.name
      if not user.is_file():
        raise DataError(
          f"{path}: expected a trace file sampled_dataset/<video>/<user>, found {_kind(path)}"
        )
      files.append((video.name, user.name, path))
  if not files:
    raise DataError(f"{sampled}: no trace files (expected sampled_dataset/<video>/<user>)")
  return files


def _kind(path: Path) -> str:
  """What stands at ``path``, for an error message about something that should not be there."""
  if path.is_dir():
    return "a folder"
  if path.is_symlink() and not path.exists():
    return "a broken symbolic link"
  if path.is_file():
    return "a file"
  return "a special file (device, pipe or socket)"


def _fingerprint(files: list[tuple[str, str, Path]]) -> str:
  """The cache key of ``files`` (see the module doc): a hash of their names and contents."""
  # The validation rules are part of the key: a cache parsed under other rules is stale too.
  rules = f"v{_CACHE_VERSION} {SAMPLE_PERIOD} {UNIT_NORM_TOLERANCE} {TIMESTAMP_TOLERANCE}"
  digest = hashlib.blake2b(rules.encode())
  for video, user, path in files:
    try:
      data = path.read_bytes()
    except OSError as err:
      raise DataError(f"{path}: cannot read trace file ({err})") from err
    # Names cannot hold '/' or NUL, and the length prefix ends each file's bytes, so no two
    # different datasets feed the hash the same stream.
    digest.update(f"\0{video}/{user}\0{len(data)}\0".encode())
    digest.update(data)
  return digest.hexdigest()


def _cache_path(dataset_dir: Path) -> Path:
  root = Path(os.environ.get("FEDVP_CACHE", Path.home() / ".cache" / "fedvp_jax"))
  tag = hashlib.sha256(str(dataset_dir.resolve()).encode()).hexdigest()[:16]
  return root / f"{dataset_dir.name}-{tag}.npz"


def _read_cache(path: Path, fingerprint: str) -> dict[tuple[str, str], np.ndarray] | None:
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["fingerprint"]) != fingerprint:
        return None
      positions, offsets = z["positions"], z["offsets"]
      keys = zip(z["videos"].tolist(), z["users"].tolist(), strict=True)
      return {
        (str(v), str(u)): positions[offsets[i] : offsets[i + 1]] for i, (v, u) in enumerate(keys)
      }
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
    warnings.warn(
      f"ignoring unreadable trace cache {path} ({err}); re-reading the traces", stacklevel=2
    )
    return None


def _write_cache(path: Path, fingerprint: str, traces: dict[tuple[str, str], np.ndarray]) -> None:
  keys = list(traces)
  lengths = [len(traces[k]) for k in keys]
  tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
      tmp,
      fingerprint=np.array(fingerprint),
      positions=np.concatenate([traces[k] for k in keys]),
      offsets=np.concatenate([[0], np.cumsum(lengths)]),
      videos=np.array([v for v, _ in keys]),
      users=np.array([u for _, u in keys]),
    )
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written cache
  except OSError as err:
    warnings.warn(f"cannot write trace cache {path} ({err}); continuing without it", stacklevel=2)
    tmp.unlink(missing_ok=True)
