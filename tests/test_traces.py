"""Tests of trace and split file reading, validation, the parsed-array cache and ordering."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import smooth_trace, write_dataset

from fedvp_jax.data import traces as traces_mod
from fedvp_jax.data.traces import load_trace_dir, natural_key, read_trace_file
from fedvp_jax.errors import DataError


def trace_text(trace: np.ndarray, fmt: str = "{}") -> str:
  rows = [
    f"{0.2 * i:.1f}," + ",".join(fmt.format(float(c)) for c in row) for i, row in enumerate(trace)
  ]
  return "\n".join(rows) + "\n"


def good_rows(n: int = 6, seed: int = 0) -> list[str]:
  trace = smooth_trace(np.random.default_rng(seed), n)
  return trace_text(trace).splitlines()


def write_rows(path: Path, rows: list[str]) -> Path:
  path.write_text("\n".join(rows) + "\n")
  return path


def assert_data_error(path: Path, lineno: int | None, what: str, call) -> str:
  """``call()`` raises DataError naming ``path``, ``lineno`` (if any) and matching ``what``."""
  with pytest.raises(DataError) as info:
    call()
  message = str(info.value)
  assert str(path) in message, message
  if lineno is not None:
    assert f"{path}:{lineno}:" in message, message
  assert re.search(what, message, re.IGNORECASE), message
  return message


def same_traces(a, b) -> None:
  assert a.videos == b.videos and a.users == b.users and a.name == b.name
  assert set(a.traces) == set(b.traces)
  for k in a.traces:
    np.testing.assert_array_equal(a.traces[k], b.traces[k])
  assert a.split == b.split


# --- one trace file --------------------------------------------------------------------------


def test_read_valid_file_matches_independent_parse(tmp_path):
  trace = smooth_trace(np.random.default_rng(3), 25)
  path = tmp_path / "7"
  path.write_text(trace_text(trace))
  got = read_trace_file(path)
  raw = np.loadtxt(path, delimiter=",")
  expected = raw[:, 1:] / np.linalg.norm(raw[:, 1:], axis=1, keepdims=True)
  assert got.dtype == np.float32
  assert got.shape == (25, 3)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_blank_lines_and_spaces_are_tolerated(tmp_path):
  rows = good_rows(4)
  rows = [rows[0], "", rows[1].replace(",", ", "), "   ", rows[2], rows[3]]
  got = read_trace_file(write_rows(tmp_path / "t", rows))
  ref = np.array([[float(f) for f in r.split(",")] for r in good_rows(4)])[:, 1:]
  np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)


def test_slightly_non_unit_vector_is_renormalised(tmp_path):
  rows = good_rows(5)
  t, x, y, z = (float(f) for f in rows[2].split(","))
  rows[2] = f"{t},{1.03 * x},{1.03 * y},{1.03 * z}"
  got = read_trace_file(write_rows(tmp_path / "t", rows))
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(got[2], np.array([x, y, z]) / np.linalg.norm([x, y, z]), atol=1e-6)


@pytest.mark.parametrize(
  "line, bad, what",
  [
    (3, "0.4,1.0,0.0", r"expected 4 .*fields.*got 3"),
    (2, "0.2,1.0,0.0,0.0,0.0", r"expected 4 .*fields.*got 5"),
    (4, "0.6,abc,0.0,0.0", r"non-numeric"),
    (3, "0.4,1.0,,0.0", r"non-numeric"),
    (5, "0.8,nan,0.0,1.0", r"NaN"),
    (2, "0.2,1.0,inf,0.0", r"non-finite"),
    (2, "0.2,1.0,0.0,-inf", r"non-finite"),
    (4, "0.6,0.5,0.0,0.0", r"norm 0\.5000.*unit vector"),
    (3, "0.4,1.2,0.0,0.0", r"norm 1\.2000.*unit vector"),
    (3, "0.4,0.0,0.0,0.0", r"norm 0\.0000.*unit vector"),
    (4, "0.9,1.0,0.0,0.0", r"irregular timestamp.*0\.5"),
    (2, "0.0,1.0,0.0,0.0", r"irregular timestamp"),
    (1, "t,x,y,z", r"non-numeric"),
  ],
)
def test_bad_row_names_file_line_and_problem(tmp_path, line, bad, what):
  rows = good_rows(6)
  rows[line - 1] = bad
  path = write_rows(tmp_path / "12", rows)
  assert_data_error(path, line, what, lambda: read_trace_file(path))


def test_line_numbers_count_blank_lines(tmp_path):
  rows = good_rows(4)
  rows = [rows[0], "", rows[1], "", "0.6,1.0,0.0,nan"]
  path = write_rows(tmp_path / "t", rows)
  assert_data_error(path, 5, "non-finite", lambda: read_trace_file(path))


def test_irregular_timestamp_points_at_later_row(tmp_path):
  rows = good_rows(8)
  # Rows 1-4 at 0.0 .. 0.6, then a gap: row 5 at 1.0 instead of 0.8.
  late = [f"{0.2 * i + 0.2:.1f}," + r.split(",", 1)[1] for i, r in enumerate(rows[4:], 4)]
  rows = rows[:4] + late
  path = write_rows(tmp_path / "t", rows)
  assert_data_error(path, 5, r"irregular timestamp.*0\.4", lambda: read_trace_file(path))


def test_timestamp_going_backwards_names_file_and_line(tmp_path):
  rows = good_rows(6)
  rows[3] = "0.2," + rows[3].split(",", 1)[1]  # 0.0, 0.2, 0.4, then back to 0.2
  path = write_rows(tmp_path / "back", rows)
  message = assert_data_error(
    path, 4, r"irregular timestamp: step of -0\.2000 s", lambda: read_trace_file(path)
  )
  assert "\n" not in message


@pytest.mark.parametrize(
  "bad", ["0.2,1.0,0.0", "0.2,1,0,0,0", "0.2,nan,0,1", "0.2,0.5,0,0", "0.9,1,0,0", "a,b\tc,d,e"]
)
def test_bad_row_error_is_one_line(tmp_path, bad):
  rows = good_rows(4)
  rows[1] = bad
  path = write_rows(tmp_path / "one", rows)
  message = assert_data_error(path, 2, ".", lambda: read_trace_file(path))
  assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
  path = tmp_path / "3"
  path.write_text(content)
  assert_data_error(path, None, "empty", lambda: read_trace_file(path))


def test_unreadable_file_is_a_data_error(tmp_path):
  path = tmp_path / "bin"
  path.write_bytes(b"\xff\xfe\x00\x81garbage")
  assert_data_error(path, None, "cannot read|non-numeric", lambda: read_trace_file(path))


def test_bad_trace_inside_dataset_names_the_file(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  bad = folder / "sampled_dataset" / "2_video" / "1"
  rows = bad.read_text().splitlines()
  rows[6] = "1.2,nan,0,0"
  write_rows(bad, rows)
  assert_data_error(bad, 7, "non-finite", lambda: load_trace_dir(folder))


# --- split files and folders -----------------------------------------------------------------


@pytest.fixture
def split_folder(tmp_path) -> Path:
  return write_dataset(tmp_path, videos=3, users=4, length=12, split=(["1_video"], ["3_video"]))


def test_split_files_are_read(split_folder):
  ts = load_trace_dir(split_folder)
  assert ts.split == {
    "train": tuple((str(u), "1_video") for u in range(4)),
    "test": tuple((str(u), "3_video") for u in range(4)),
  }


def test_no_split_files_gives_no_split(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  assert load_trace_dir(folder).split is None


@pytest.mark.parametrize(
  "file, content, line, what",
  [
    ("train_set", "video,user\n0,1_video\n", 1, r"header 'user,video'"),
    ("test_set", "0,3_video\n1,3_video\n", 1, r"header 'user,video'"),
    ("test_set", "", 1, r"header 'user,video'"),
    ("test_set", "user,video\n0,3_video\n1,99_video\n", 3, r"video '99_video'"),
    ("train_set", "user,video\n0,1_video\n\n77,1_video\n", 4, r"user '77'"),
    ("train_set", "user,video\n0,1_video,extra\n", 2, r"expected 'user,video'"),
  ],
)
def test_bad_split_file(split_folder, file, content, line, what):
  path = split_folder / file
  path.write_text(content)
  assert_data_error(path, line, what, lambda: load_trace_dir(split_folder))


@pytest.mark.parametrize("file", ["train_set", "test_set"])
@pytest.mark.parametrize("content", ["user,video\n", "user,video", "user,video\n\n\n"])
def test_split_file_with_only_a_header(split_folder, file, content):
  path = split_folder / file
  path.write_text(content)
  assert_data_error(
    path, None, r"lists no \(user, video\) pair", lambda: load_trace_dir(split_folder)
  )


def test_empty_split_file_says_it_lists_no_pair(split_folder):
  path = split_folder / "train_set"
  path.write_text("")
  assert_data_error(
    path, 1, r"empty.*lists no \(user, video\) pair", lambda: load_trace_dir(split_folder)
  )


def test_split_pair_listed_twice(split_folder):
  path = split_folder / "test_set"
  path.write_text("user,video\n0,3_video\n1,3_video\n 0 , 3_video\n")
  assert_data_error(
    path,
    4,
    r"user '0', video '3_video' is listed twice \(first on line 2\)",
    lambda: load_trace_dir(split_folder),
  )


def test_unreadable_split_file(split_folder):
  path = split_folder / "train_set"
  path.write_bytes(b"\xff\xfeu\x00s\x00")
  assert_data_error(path, None, "cannot read split file", lambda: load_trace_dir(split_folder))


@pytest.mark.parametrize("kept, dropped", [("train_set", "test_set"), ("test_set", "train_set")])
def test_one_split_file_without_the_other(split_folder, kept, dropped):
  (split_folder / dropped).unlink()
  message = assert_data_error(
    split_folder / kept,
    None,
    f"without its partner {dropped}",
    lambda: load_trace_dir(split_folder),
  )
  assert "both" in message


@pytest.mark.parametrize(
  "make, found", [("folder", "a folder"), ("link", "a broken symbolic link")]
)
def test_split_file_that_is_not_a_file(split_folder, make, found):
  path = split_folder / "test_set"
  path.unlink()
  if make == "folder":
    path.mkdir()
  else:
    path.symlink_to(split_folder / "nowhere")
  assert_data_error(
    path, None, f"expected a split file.*found {found}", lambda: load_trace_dir(split_folder)
  )


def test_split_pair_without_trace_is_rejected(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10, split=(["1_video"], ["2_video"]))
  (folder / "sampled_dataset" / "2_video" / "1").unlink()  # user 1 exists, video 2 exists
  path = folder / "test_set"
  path.write_text("user,video\n0,2_video\n1,2_video\n")
  assert_data_error(path, 3, "1.*2_video", lambda: load_trace_dir(folder))


def test_folder_without_sampled_dataset(tmp_path):
  folder = tmp_path / "NotADataset"
  folder.mkdir()
  (folder / "readme.txt").write_text("hello")
  assert_data_error(folder, None, "sampled_dataset", lambda: load_trace_dir(folder))


def test_sampled_dataset_without_files(tmp_path):
  folder = tmp_path / "Empty"
  (folder / "sampled_dataset" / "1_video").mkdir(parents=True)
  assert_data_error(folder, None, "no trace files", lambda: load_trace_dir(folder))


def test_folder_where_trace_file_belongs_is_an_error(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  stray = folder / "sampled_dataset" / "2_video" / "1"
  stray.unlink()
  stray.mkdir()
  (stray / "0").write_text(trace_text(smooth_trace(np.random.default_rng(0), 10)))
  message = assert_data_error(stray, None, "expected a trace file", lambda: load_trace_dir(folder))
  assert "found a folder" in message


def test_broken_link_where_trace_file_belongs_is_an_error(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  link = folder / "sampled_dataset" / "1_video" / "7"
  link.symlink_to(tmp_path / "nowhere")
  assert_data_error(link, None, "broken symbolic link", lambda: load_trace_dir(folder))


def test_link_to_a_trace_file_is_a_trace(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  target = folder / "sampled_dataset" / "1_video" / "0"
  (folder / "sampled_dataset" / "2_video" / "9").symlink_to(target)
  ts = load_trace_dir(folder)
  np.testing.assert_array_equal(ts.traces["2_video", "9"], ts.traces["1_video", "0"])


def test_file_where_video_folder_belongs_is_an_error(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  stray = folder / "sampled_dataset" / "notes.txt"
  stray.write_text("0.0,1,0,0\n")
  message = assert_data_error(
    stray, None, "expected a video folder", lambda: load_trace_dir(folder)
  )
  assert "found a file" in message


def test_video_folder_without_traces_is_an_error(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  empty = folder / "sampled_dataset" / "3_video"
  empty.mkdir()
  (empty / ".DS_Store").write_bytes(b"\x00\x01")
  assert_data_error(empty, None, "no trace files", lambda: load_trace_dir(folder))


def test_hidden_entries_are_ignored(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  reference = load_trace_dir(folder, use_cache=False)
  sampled = folder / "sampled_dataset"
  (sampled / ".DS_Store").write_bytes(b"\x00\x01")
  (sampled / "1_video" / "._0").write_bytes(b"\x00\x05Mac")
  (sampled / "1_video" / ".0.swp").write_text("garbage")
  (sampled / ".ipynb_checkpoints" / "0").mkdir(parents=True)
  (sampled / "2_video" / ".git").mkdir()
  same_traces(reference, load_trace_dir(folder, use_cache=False))


# --- ordering --------------------------------------------------------------------------------


def test_natural_order_of_videos_and_users(tmp_path):
  folder = tmp_path / "Order"
  videos = ["10_Cows", "2_Diner", "1_PortoRiverside", "19_Touvet", "9_MattSwift"]
  users = ["10", "9", "0", "2", "100", "11"]
  rng = np.random.default_rng(0)
  for v in videos:
    (folder / "sampled_dataset" / v).mkdir(parents=True)
    for u in users[: 3 + len(v) % 3]:  # not every user watches every video
      (folder / "sampled_dataset" / v / u).write_text(trace_text(smooth_trace(rng, 5)))
  ts = load_trace_dir(folder)
  assert ts.videos == ("1_PortoRiverside", "2_Diner", "9_MattSwift", "10_Cows", "19_Touvet")
  present = {u for v in videos for u in users[: 3 + len(v) % 3]}
  assert ts.users == tuple(u for u in ["0", "2", "9", "10", "11", "100"] if u in present)
  for u in ts.users:
    expected = tuple(v for v in ts.videos if u in users[: 3 + len(v) % 3])
    assert ts.videos_of(u) == expected


def test_natural_key():
  names = ["b10", "a", "b2", "2_x", "10_x", "1_x", "b1"]
  assert sorted(names, key=natural_key) == ["1_x", "2_x", "10_x", "a", "b1", "b2", "b10"]


# --- the parsed-array cache ------------------------------------------------------------------


def forbid_parsing(monkeypatch) -> None:
  def fail(path):
    raise AssertionError(f"trace file parsed although the cache is valid: {path}")

  monkeypatch.setattr(traces_mod, "read_trace_file", fail)


def count_parsing(monkeypatch) -> list[Path]:
  parsed = []
  original = traces_mod.read_trace_file

  def counting(path):
    parsed.append(Path(path))
    return original(path)

  monkeypatch.setattr(traces_mod, "read_trace_file", counting)
  return parsed


def test_second_load_comes_from_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDVP_CACHE", str(tmp_path / "cache"))
  folder = write_dataset(tmp_path, split=(["1_video"], ["2_video", "3_video"]))
  parsed = count_parsing(monkeypatch)
  first = load_trace_dir(folder)
  assert len(parsed) == 12
  assert len(list((tmp_path / "cache").glob("Tiny-*.npz"))) == 1
  forbid_parsing(monkeypatch)
  second = load_trace_dir(folder)
  same_traces(first, second)


def test_use_cache_false_parses_every_time(tmp_path, monkeypatch):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  load_trace_dir(folder)  # fills the cache
  parsed = count_parsing(monkeypatch)
  load_trace_dir(folder, use_cache=False)
  assert len(parsed) == 4


def test_changed_size_invalidates_cache(tmp_path, monkeypatch):
  folder = write_dataset(tmp_path, videos=2, users=3, length=10)
  first = load_trace_dir(folder)
  changed = folder / "sampled_dataset" / "2_video" / "1"
  new = smooth_trace(np.random.default_rng(99), 14)
  changed.write_text(trace_text(new))
  parsed = count_parsing(monkeypatch)
  second = load_trace_dir(folder)
  assert changed in parsed
  expected = new / np.linalg.norm(new, axis=1, keepdims=True)
  np.testing.assert_allclose(second.traces["2_video", "1"], expected, atol=1e-6)
  assert second.traces["2_video", "1"].shape == (14, 3)
  np.testing.assert_array_equal(second.traces["1_video", "0"], first.traces["1_video", "0"])
  # The rebuilt cache holds the new content.
  forbid_parsing(monkeypatch)
  third = load_trace_dir(folder)
  np.testing.assert_array_equal(third.traces["2_video", "1"], second.traces["2_video", "1"])


def test_changed_mtime_same_size_invalidates_cache(tmp_path):
  folder = tmp_path / "Fixed"
  path = folder / "sampled_dataset" / "1_video" / "0"
  path.parent.mkdir(parents=True)
  old = smooth_trace(np.random.default_rng(1), 10)
  path.write_text(trace_text(old, "{:+.6f}"))
  size, mtime = path.stat().st_size, path.stat().st_mtime_ns
  first = load_trace_dir(folder)
  new = smooth_trace(np.random.default_rng(2), 10)
  path.write_text(trace_text(new, "{:+.6f}"))
  os.utime(path, ns=(mtime + 3_000_000_000, mtime + 3_000_000_000))
  assert path.stat().st_size == size
  second = load_trace_dir(folder)
  expected = np.round(new, 6) / np.linalg.norm(np.round(new, 6), axis=1, keepdims=True)
  np.testing.assert_allclose(second.traces["1_video", "0"], expected, atol=1e-6)
  assert not np.allclose(first.traces["1_video", "0"], second.traces["1_video", "0"])


def test_edit_keeping_size_and_mtime_invalidates_cache(tmp_path, monkeypatch):
  folder = tmp_path / "InPlace"
  path = folder / "sampled_dataset" / "1_video" / "0"
  path.parent.mkdir(parents=True)
  old = smooth_trace(np.random.default_rng(1), 10)
  path.write_text(trace_text(old, "{:+.6f}"))
  before = path.stat()
  first = load_trace_dir(folder)
  new = smooth_trace(np.random.default_rng(2), 10)
  path.write_text(trace_text(new, "{:+.6f}"))
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
  parsed = count_parsing(monkeypatch)
  second = load_trace_dir(folder)
  assert parsed == [path]
  expected = np.round(new, 6) / np.linalg.norm(np.round(new, 6), axis=1, keepdims=True)
  np.testing.assert_allclose(second.traces["1_video", "0"], expected, atol=1e-6)
  assert not np.allclose(first.traces["1_video", "0"], second.traces["1_video", "0"])


def test_touch_without_edit_keeps_cache(tmp_path, monkeypatch):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  first = load_trace_dir(folder)
  path = folder / "sampled_dataset" / "2_video" / "0"
  later = path.stat().st_mtime_ns + 5_000_000_000
  os.utime(path, ns=(later, later))
  forbid_parsing(monkeypatch)
  same_traces(first, load_trace_dir(folder))


def test_added_trace_invalidates_cache(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  assert load_trace_dir(folder).users == ("0", "1")
  extra = folder / "sampled_dataset" / "1_video" / "5"
  extra.write_text(trace_text(smooth_trace(np.random.default_rng(5), 10)))
  ts = load_trace_dir(folder)
  assert ts.users == ("0", "1", "5")
  assert ts.videos_of("5") == ("1_video",)


def test_removed_trace_invalidates_cache(tmp_path):
  folder = write_dataset(tmp_path, videos=2, users=2, length=10)
  load_trace_dir(folder)
  (folder / "sampled_dataset" / "2_video" / "1").unlink()
  ts = load_trace_dir(folder)
  assert set(ts.traces) == {("1_video", "0"), ("1_video", "1"), ("2_video", "0")}


def test_same_name_in_different_roots_does_not_share_cache(tmp_path):
  a = write_dataset(tmp_path / "a", seed=1)
  b = write_dataset(tmp_path / "b", seed=2)
  ta, tb = load_trace_dir(a), load_trace_dir(b)
  assert not np.allclose(ta.traces["1_video", "0"], tb.traces["1_video", "0"])
  np.testing.assert_array_equal(load_trace_dir(a).traces["1_video", "0"], ta.traces["1_video", "0"])


def corrupt_garbage(data: bytes) -> bytes:
  return b"this is not an npz file" * 20


def corrupt_truncated(data: bytes) -> bytes:
  return data[: len(data) // 2]


def corrupt_empty(data: bytes) -> bytes:
  return b""


def corrupt_flipped_byte(data: bytes) -> bytes:
  i = len(data) // 3  # inside the stored arrays
  return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


@pytest.mark.parametrize(
  "corrupt",
  [
    corrupt_garbage,
    corrupt_truncated,
    corrupt_empty,
    corrupt_flipped_byte,
  ],
)
def test_corrupt_cache_warns_and_reloads(tmp_path, monkeypatch, corrupt):
  monkeypatch.setenv("FEDVP_CACHE", str(tmp_path / "cache"))
  folder = write_dataset(tmp_path, videos=2, users=3, length=15)
  reference = load_trace_dir(folder, use_cache=False)
  load_trace_dir(folder)
  (cache,) = (tmp_path / "cache").glob("Tiny-*.npz")
  cache.write_bytes(corrupt(cache.read_bytes()))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reloaded = load_trace_dir(folder)
  assert any("cache" in str(w.message) and issubclass(w.category, UserWarning) for w in caught)
  same_traces(reference, reloaded)
  # The rewritten cache is valid again.
  forbid_parsing(monkeypatch)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    same_traces(reference, load_trace_dir(folder))
