"""Tests of dataset specs (``<Name>-m<M>-h<H>``), aliases, the data root and loading."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_dataset

from fedvp_jax.data.datasets import (
  DatasetSpec,
  available_datasets,
  load_traces,
  parse_spec,
  resolve_data_root,
)
from fedvp_jax.data.traces import load_trace_dir
from fedvp_jax.errors import DataError, SettingError


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
  """Tests here decide themselves whether $FEDVP_DATA is set."""
  monkeypatch.delenv("FEDVP_DATA", raising=False)


@pytest.mark.parametrize(
  "text, name, m, h",
  [
    ("David-m10-h1", "David_MMSys_18", 10, 1),
    ("David-m5-h25", "David_MMSys_18", 5, 25),
    ("David_MMSys_18-m1-h1", "David_MMSys_18", 1, 1),
    ("Xu_PAMI_18-m10-h5", "Xu_PAMI_18", 10, 5),
    ("Wu_MMSys_17-m30-h25", "Wu_MMSys_17", 30, 25),
    ("My-Data-Set-m3-h2", "My-Data-Set", 3, 2),
    ("a-m1-h-m2-h3", "a-m1-h", 2, 3),
    ("Synthetic-m10-h1", "Synthetic", 10, 1),
    ("Davidx-m2-h2", "Davidx", 2, 2),  # only the exact alias is resolved
  ],
)
def test_parse_good_specs(text, name, m, h):
  spec = parse_spec(text)
  assert spec == DatasetSpec(name, m, h)
  assert (spec.name, spec.history, spec.horizon) == (name, m, h)


def test_spec_str_round_trips():
  spec = parse_spec("Xu_PAMI_18-m10-h5")
  assert str(spec) == "Xu_PAMI_18-m10-h5"
  assert parse_spec(str(spec)) == spec
  assert str(parse_spec("David-m4-h2")) == "David_MMSys_18-m4-h2"


@pytest.mark.parametrize(
  "text, what",
  [
    ("David-m0-h1", r"at least 1.*m=0"),
    ("David-m10-h0", r"at least 1.*h=0"),
    ("David-m-3-h2", r"at least 1.*m=-3"),
    ("David", r"expected '<Name>-m<M>-h<H>'"),
    ("David-m10", r"expected '<Name>-m<M>-h<H>'"),
    ("David-mx-h1", r"expected '<Name>-m<M>-h<H>'"),
    ("David-m10-h1.5", r"expected '<Name>-m<M>-h<H>'"),
    ("-m10-h1", r"expected '<Name>-m<M>-h<H>'"),
    ("", r"expected '<Name>-m<M>-h<H>'"),
  ],
)
def test_parse_bad_specs(text, what):
  with pytest.raises(DataError, match=what) as info:
    parse_spec(text)
  assert repr(text) in str(info.value)


@pytest.mark.parametrize(
  "text, name",
  [
    ("../x-m10-h1", "../x"),
    ("a/b-m1-h1", "a/b"),
    ("/abs/David_MMSys_18-m10-h1", "/abs/David_MMSys_18"),
    ("..-m1-h1", ".."),
    (".-m1-h1", "."),
    ("..\\x-m1-h1", "..\\x"),
    ("C:\\data\\David-m1-h1", "C:\\data\\David"),
    ("David/-m10-h1", "David/"),
    ("a\0b-m1-h1", "a\0b"),
  ],
)
def test_parse_rejects_names_with_path_components(text, name):
  with pytest.raises(DataError, match="not a plain folder name") as info:
    parse_spec(text)
  message = str(info.value)
  assert repr(text) in message and repr(name) in message


def test_spec_built_directly_rejects_path_names(tmp_path):
  with pytest.raises(DataError, match=r"'\.\./Tiny'.*not a plain folder name"):
    DatasetSpec("../Tiny", 3, 2)


@pytest.mark.parametrize("name", ["..x", "x..", "a.b", ".hidden_DS", "My Data"])
def test_names_with_dots_but_no_path_components_are_plain(name):
  assert parse_spec(f"{name}-m2-h1").name == name


def test_escaping_name_cannot_load_a_dataset_beside_the_root(tmp_path):
  write_dataset(tmp_path, name="Outside", videos=2, users=2, length=10)
  root = tmp_path / "root"
  root.mkdir()
  with pytest.raises(DataError, match="not a plain folder name"):
    load_traces(parse_spec("../Outside-m2-h1"), root)


def test_missing_data_root_tells_how_to_set_it():
  # A SettingError of data_dir: the command line names its flag (tests/test_cli.py).
  with pytest.raises(SettingError) as info:
    resolve_data_root()
  message = str(info.value)
  assert message.startswith("data_dir: no data root") and "FEDVP_DATA" in message
  with pytest.raises(SettingError, match=r"data_dir.*FEDVP_DATA"):
    load_traces(parse_spec("David-m10-h1"))


def test_empty_env_var_is_missing(monkeypatch):
  monkeypatch.setenv("FEDVP_DATA", "")
  with pytest.raises(SettingError, match="FEDVP_DATA"):
    resolve_data_root()


def test_data_root_from_arg_and_env(tmp_path, monkeypatch):
  assert resolve_data_root(tmp_path) == tmp_path
  assert resolve_data_root(str(tmp_path)) == tmp_path
  monkeypatch.setenv("FEDVP_DATA", str(tmp_path))
  assert resolve_data_root() == tmp_path
  other = tmp_path / "other"
  other.mkdir()
  assert resolve_data_root(other) == other  # the argument wins over the variable


@pytest.mark.parametrize("via_env", [False, True])
def test_data_root_not_a_folder(tmp_path, monkeypatch, via_env):
  missing = tmp_path / "nowhere"
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  for bad in (missing, a_file):
    if via_env:
      monkeypatch.setenv("FEDVP_DATA", str(bad))
      arg, source = None, "FEDVP_DATA"
    else:
      arg, source = bad, "data_dir"
    with pytest.raises(DataError, match="not a folder") as info:
      resolve_data_root(arg)
    assert str(bad) in str(info.value) and source in str(info.value)


def test_unknown_dataset_lists_known_ones(tmp_path):
  write_dataset(tmp_path, name="Tiny")
  write_dataset(tmp_path, name="Other_DS_20", videos=2, users=2, length=10)
  (tmp_path / "not_a_dataset").mkdir()
  with pytest.raises(DataError) as info:
    load_traces(parse_spec("Nope-m2-h1"), tmp_path)
  message = str(info.value)
  assert "'Nope'" in message
  for known in ("Tiny", "Other_DS_20", "Synthetic"):
    assert known in message
  assert "not_a_dataset" not in message
  assert "David -> David_MMSys_18" in message
  assert available_datasets(tmp_path) == ["Synthetic", "Other_DS_20", "Tiny"]


def test_alias_resolves_to_folder_name(tmp_path):
  write_dataset(tmp_path, name="David_MMSys_18", videos=2, users=2, length=10)
  ts = load_traces(parse_spec("David-m2-h1"), tmp_path)
  assert ts.name == "David_MMSys_18"
  assert len(ts.traces) == 4


def test_synthetic_needs_no_root():
  ts = load_traces(parse_spec("Synthetic-m10-h1"), seed=3)
  assert ts.name == "Synthetic"
  assert len(ts.users) > 0 and len(ts.videos) > 1
  for trace in ts.traces.values():
    np.testing.assert_allclose(np.linalg.norm(trace, axis=-1), 1.0, atol=1e-5)
  again = load_traces(parse_spec("Synthetic-m10-h1"), "/definitely/not/a/folder", seed=3)
  key = (ts.videos[0], ts.users[0])
  np.testing.assert_array_equal(again.traces[key], ts.traces[key])


@pytest.mark.parametrize("seed", [-1, 1.5, None, "3", True])
def test_synthetic_bad_seed_is_a_data_error(seed):
  with pytest.raises(DataError, match=r"Synthetic dataset: seed must be an integer >= 0"):
    load_traces(parse_spec("Synthetic-m10-h1"), seed=seed)


def assert_is_tiny(ts, folder):
  reference = load_trace_dir(folder, use_cache=False)
  assert ts.name == "Tiny"
  assert ts.videos == ("1_video", "2_video", "3_video")
  assert ts.users == ("0", "1", "2", "3")
  assert set(ts.traces) == set(reference.traces)
  for key, trace in ts.traces.items():
    assert trace.shape == (40, 3)
    np.testing.assert_array_equal(trace, reference.traces[key])
  assert ts.split["train"] == tuple((str(u), v) for v in ("1_video", "2_video") for u in range(4))
  assert ts.split["test"] == tuple((str(u), "3_video") for u in range(4))


def test_load_traces_via_arg(tiny_root):
  assert_is_tiny(load_traces(parse_spec("Tiny-m3-h2"), tiny_root), tiny_root / "Tiny")
  assert_is_tiny(load_traces(parse_spec("Tiny-m3-h2"), str(tiny_root)), tiny_root / "Tiny")


def test_load_traces_via_env(tiny_root, monkeypatch):
  monkeypatch.setenv("FEDVP_DATA", str(tiny_root))
  assert_is_tiny(load_traces(parse_spec("Tiny-m3-h2")), tiny_root / "Tiny")


def test_load_traces_spec_window_shape_does_not_matter(tiny_root):
  a = load_traces(parse_spec("Tiny-m1-h1"), tiny_root)
  b = load_traces(parse_spec("Tiny-m30-h9"), tiny_root)
  assert set(a.traces) == set(b.traces)
