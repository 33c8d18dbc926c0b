"""Trace files, dataset specs, windows and on-device client data."""

from .datasets import (
  ALIASES,
  DATA_ENV_VAR,
  DatasetSpec,
  available_datasets,
  load_traces,
  parse_spec,
  resolve_data_root,
)
from .federated import (
  ClientData,
  EvalWindows,
  build_client_data,
  client_keys,
  sample_batches,
  sample_final_targets,
  sample_indices,
  select_users,
  stack_windows,
)
from .protocols import (
  client_candidates,
  first_window,
  new_viewer_candidates,
  new_viewer_test,
  new_viewer_windows,
)
from .synthetic import synthetic_traces
from .traces import (
  SAMPLE_PERIOD,
  TraceSet,
  load_trace_dir,
  natural_key,
  read_split_file,
  read_trace_file,
)
from .windows import SPLITS, Windows, make_windows, split_videos, viewer_windows

__all__ = [
  "ALIASES",
  "DATA_ENV_VAR",
  "SAMPLE_PERIOD",
  "SPLITS",
  "ClientData",
  "DatasetSpec",
  "EvalWindows",
  "TraceSet",
  "Windows",
  "available_datasets",
  "build_client_data",
  "client_candidates",
  "client_keys",
  "first_window",
  "load_trace_dir",
  "load_traces",
  "make_windows",
  "natural_key",
  "new_viewer_candidates",
  "new_viewer_test",
  "new_viewer_windows",
  "parse_spec",
  "read_split_file",
  "read_trace_file",
  "resolve_data_root",
  "sample_batches",
  "sample_final_targets",
  "sample_indices",
  "select_users",
  "split_videos",
  "stack_windows",
  "synthetic_traces",
  "viewer_windows",
]
