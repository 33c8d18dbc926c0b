"""Shared fixtures: where the real traces are, a private trace cache, tiny trace folders."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedvp_jax.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


TINY_RUN = RunConfig.of(
  dataset="Synthetic-m4-h2",
  model="lstm",
  num_clients=3,
  rounds=3,
  local_steps=2,
  batch_size=8,
  latent_dim=12,
  grain=16,
  heatmap_sigma=30.0,
  gen_batch_size=8,
  gen_steps=2,
)
"""A run small enough for any test: synthetic data, 3 clients, 3 rounds, a tiny LSTM (and
tiny FedGen settings, for the FedGen family)."""


def real_data_root() -> Path | None:
  """``$FEDVP_DATA`` if set, else ``../shared/data`` beside the repo, if it holds David."""
  candidates = [os.environ.get("FEDVP_DATA"), REPO.parent / "shared" / "data"]
  for c in candidates:
    if c and (Path(c) / "David_MMSys_18" / "sampled_dataset").is_dir():
      return Path(c)
  return None


@pytest.fixture(scope="session")
def david_root() -> Path:
  """The data root holding David_MMSys_18; skips the test when it is absent."""
  root = real_data_root()
  if root is None:
    pytest.skip(
      "real traces not found: set FEDVP_DATA to a folder holding David_MMSys_18/ "
      "(CI points it at ../shared/data)"
    )
  return root


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """Tests build the same rounds from fresh closures; XLA's persistent cache, keyed on the
  compiled program rather than the Python function, compiles each distinct program once per
  session."""
  import jax

  settings = {
    "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla-cache")),
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)  # and the commands tests run as subprocesses


@contextlib.contextmanager
def compiles(name: str) -> Iterator[list[str]]:
  """Collects, while open, a line for every program named ``jit(name)`` that JAX lowers to
  compile (a hit in the persistent cache still counts: it is a program the run needed)."""
  import jax

  found: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
      message = record.getMessage()
      if message.startswith(f"Compiling jit({name})"):
        found.append(message[:200])

  handler = Collect(logging.DEBUG)
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield found
  finally:
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def private_trace_cache(tmp_path_factory, monkeypatch):
  """Every test session gets its own trace cache, so tests never see a user's cache."""
  monkeypatch.setenv("FEDVP_CACHE", str(tmp_path_factory.getbasetemp() / "trace-cache"))


def smooth_trace(rng: np.random.Generator, length: int) -> np.ndarray:
  """A random, smooth head trace ``f32[length, 3]`` of unit vectors (a few degrees a step)."""
  lon = np.cumsum(rng.normal(0, 0.05, length)) + rng.uniform(-np.pi, np.pi)
  lat = np.clip(np.cumsum(rng.normal(0, 0.02, length)), -1.2, 1.2)
  return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def write_dataset(
  root: Path,
  name: str = "Tiny",
  videos: int = 3,
  users: int = 4,
  length: int = 40,
  seed: int = 0,
  split: tuple[list[str], list[str]] | None = None,
) -> Path:
  """Writes a dataset folder in the trace layout; ``split`` = (train videos, test videos)."""
  rng = np.random.default_rng(seed)
  folder = root / name
  for v in range(videos):
    video_dir = folder / "sampled_dataset" / f"{v + 1}_video"
    video_dir.mkdir(parents=True)
    for u in range(users):
      trace = smooth_trace(rng, length)
      rows = [f"{0.2 * i},{x},{y},{z}" for i, (x, y, z) in enumerate(trace)]
      (video_dir / str(u)).write_text("\n".join(rows) + "\n")
  if split is not None:
    for file, vids in zip(("train_set", "test_set"), split, strict=True):
      lines = ["user,video"] + [f"{u},{v}" for v in vids for u in range(users)]
      (folder / file).write_text("\n".join(lines) + "\n")
  return folder


@pytest.fixture
def tiny_root(tmp_path) -> Path:
  """A data root with dataset ``Tiny``: 3 videos x 4 users x 40 samples, split files naming
  videos 1-2 for training and 3 for testing."""
  write_dataset(tmp_path, split=(["1_video", "2_video"], ["3_video"]))
  return tmp_path


def tiny_client_data(root: Path, users: int, length: int):
  """``(spec, ClientData)`` of dataset ``Tiny-m4-h2`` written under ``root``: 3 videos, the
  first two for training, every user a client."""
  from fedvp_jax.data.datasets import load_traces, parse_spec
  from fedvp_jax.data.federated import build_client_data

  write_dataset(root, users=users, length=length, split=(["1_video", "2_video"], ["3_video"]))
  spec = parse_spec("Tiny-m4-h2")
  traces = load_traces(spec, root)
  return spec, build_client_data(traces, spec, traces.users)
