"""Dataset names (``<Name>-m<M>-h<H>``), aliases and the data root.

A dataset spec names a trace collection and a window shape, following the researcher's
convention: ``David-m10-h1`` is the David_MMSys_18 traces with M = 10 past samples in and
H = 1 future sample out, 0.2 s per sample. See :mod:`fedvp_jax.data.windows` for exactly
which samples a window holds.

Trace collections are folders under the data root (``data_dir`` or ``$FEDVP_DATA``) in the
layout of :mod:`fedvp_jax.data.traces`, known by their folder names; ``David`` is a short
alias of ``David_MMSys_18``. ``Synthetic`` is built in and needs no files. A name is one plain
folder name: one with a path separator, or ``.`` or ``..``, is rejected, so that neither the
data folder nor a run folder named after the dataset can lie outside its parent.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Collection
from pathlib import Path

from fedvp_jax.data.synthetic import synthetic_traces
from fedvp_jax.data.traces import TraceSet, load_trace_dir
from fedvp_jax.errors import DataError, SettingError

DATA_ENV_VAR = "FEDVP_DATA"
SYNTHETIC = "Synthetic"
ALIASES = {"David": "David_MMSys_18"}

_SPEC_RE = re.compile(r"^(?P<name>.+)-m(?P<m>-?\d+)-h(?P<h>-?\d+)$")
# Path separators of every platform (a run folder may be copied to Windows) and NUL, which no
# file system accepts in a name.
_NOT_IN_NAMES = ("/", "\\", "\0")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A parsed ``<Name>-m<M>-h<H>`` dataset name.

  Attributes:
    name: the trace collection, aliases resolved (``"David_MMSys_18"``, ``"Synthetic"``).
    history: M, the number of past samples a model sees (>= 1).
    horizon: H, the number of future samples it predicts (>= 1).
  """

  name: str
  history: int
  horizon: int

  def __post_init__(self) -> None:
    # The name becomes a path under the data root and part of run folder names, so it must be
    # one plain path component: '../x' or '/etc' would reach outside both. Checked here rather
    # than only in parse_spec so that no spec, however built, carries such a name.
    if self.name in (".", "..") or any(c in self.name for c in _NOT_IN_NAMES):
      raise DataError(
        f"dataset {str(self)!r}: the name {self.name!r} is not a plain folder name under the "
        "data root (it must not contain '/', '\\' or NUL, nor be '.' or '..')"
      )

  def __str__(self) -> str:
    return f"{self.name}-m{self.history}-h{self.horizon}"


def parse_spec(text: str) -> DatasetSpec:
  """Parses ``"David-m10-h1"`` into a :class:`DatasetSpec` (aliases resolved).

  Raises:
    DataError: when ``text`` is not of the form ``<Name>-m<M>-h<H>`` with M, H >= 1, or
      ``<Name>`` is not a plain folder name (it contains a path separator, or is ``.`` or
      ``..``).
  """
  match = _SPEC_RE.match(text)
  if not match:
    raise DataError(
      f"dataset {text!r}: expected '<Name>-m<M>-h<H>', e.g. 'David-m10-h1' "
      "(M past samples in, H future samples out, 0.2 s each)"
    )
  m, h = int(match["m"]), int(match["h"])
  if m < 1 or h < 1:
    raise DataError(
      f"dataset {text!r}: M (history) and H (horizon) must be at least 1, got m={m}, h={h}"
    )
  name = match["name"]
  return DatasetSpec(ALIASES.get(name, name), m, h)


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
  """The data root: ``data_dir`` if given, else ``$FEDVP_DATA``.

  Raises:
    SettingError: when neither is set.
    DataError: when the folder does not exist.
  """
  source = "data_dir"
  if data_dir is None:
    data_dir, source = os.environ.get(DATA_ENV_VAR), f"${DATA_ENV_VAR}"
  if not data_dir:
    raise SettingError(
      "data_dir",
      None,
      f"no data root: give one or set {DATA_ENV_VAR}=DIR, where DIR holds dataset folders "
      f"such as David_MMSys_18/sampled_dataset/ (the built-in '{SYNTHETIC}' dataset needs none)",
    )
  root = Path(data_dir).expanduser()
  if not root.is_dir():
    raise DataError(f"data root {root} (from {source}) is not a folder")
  return root


def available_datasets(root: Path | None) -> list[str]:
  """Names of the datasets under ``root`` (folders with ``sampled_dataset/``), plus Synthetic."""
  found = []
  if root is not None and root.is_dir():
    found = sorted(p.name for p in root.iterdir() if (p / "sampled_dataset").is_dir())
  return [SYNTHETIC, *found]


def load_traces(
  spec: DatasetSpec,
  data_dir: str | os.PathLike[str] | None = None,
  *,
  seed: int = 0,
  users: Collection[str] | None = None,
  split_files: bool = True,
) -> TraceSet:
  """Loads the traces that ``spec`` names.

  Args:
    spec: the dataset spec.
    data_dir: the data root; ``$FEDVP_DATA`` when ``None``. Unused for Synthetic.
    seed: the generator seed of the Synthetic dataset. Unused for file datasets.
    users: read only these viewers' trace files (see
      :func:`~fedvp_jax.data.traces.load_trace_dir`); Synthetic, which is generated, not
      read, is whole whatever this says.
    split_files: read and check the dataset's split files (see
      :func:`~fedvp_jax.data.traces.load_trace_dir`).

  Raises:
    DataError: for a missing data root, or a name that is no dataset there (the message
      lists the known ones).
  """
  if spec.name == SYNTHETIC:
    return synthetic_traces(seed=seed)
  root = resolve_data_root(data_dir)
  folder = root / spec.name
  if not (folder / "sampled_dataset").is_dir():
    known = ", ".join(available_datasets(root))
    aliases = ", ".join(f"{a} -> {n}" for a, n in ALIASES.items())
    raise DataError(
      f"unknown dataset {spec.name!r}: no folder {folder}/sampled_dataset. "
      f"Known datasets under {root}: {known} (aliases: {aliases})"
    )
  return load_trace_dir(folder, users=users, split_files=split_files)
