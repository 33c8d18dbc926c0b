"""fedvp_jax: federated viewport prediction for 360-degree video, in JAX.

The public API: code lives in the submodules, the names users need are re-exported here.
"""

from fedvp_jax import algorithms, data, heatmap, models
from fedvp_jax.algorithms import (
  ALGORITHMS,
  ClientsState,
  FederatedAlgorithm,
  FedGenConfig,
  FedGenState,
  RoundConfig,
  RoundMetrics,
  build_algorithm,
  fedavg,
  fedgen,
  over_seeds,
)
from fedvp_jax.baselines import BASELINES, constant_velocity, no_motion
from fedvp_jax.data.datasets import DatasetSpec, load_traces, parse_spec
from fedvp_jax.data.federated import ClientData, build_client_data, sample_batches, select_users
from fedvp_jax.errors import ConfigError, DataError, DivergenceError, FedVPError
from fedvp_jax.geometry import lonlat_to_vec, normalize, orthodromic_distance, rotate, vec_to_lonlat
from fedvp_jax.heatmap import heatmaps, label_weights, sample_labels
from fedvp_jax.metrics import ErrorSums, Summary, error_sums, mse, summarize
from fedvp_jax.models import Model, build_model
from fedvp_jax.report import write_report
from fedvp_jax.sharding import (
  CLIENTS_AXIS,
  client_mesh,
  shard_data,
  shard_state,
  split_clients,
  state_shardings,
)
from fedvp_jax.sweep import expand_spec, read_spec, run_sweep
from fedvp_jax.training import (
  Experiment,
  ProgressBar,
  RunConfig,
  baseline_summaries,
  beats_baselines,
  iterate_rounds,
  prepare,
  resolve_device,
  resume,
  round_key,
  run,
  run_rounds,
  seed_keys,
  summary_dict,
  train,
)

__version__ = "0.1.0"

__all__ = [
  "ALGORITHMS",
  "BASELINES",
  "CLIENTS_AXIS",
  "ClientData",
  "ClientsState",
  "ConfigError",
  "DataError",
  "DatasetSpec",
  "DivergenceError",
  "ErrorSums",
  "Experiment",
  "FedGenConfig",
  "FedGenState",
  "FedVPError",
  "FederatedAlgorithm",
  "Model",
  "ProgressBar",
  "RoundConfig",
  "RoundMetrics",
  "RunConfig",
  "Summary",
  "algorithms",
  "baseline_summaries",
  "beats_baselines",
  "build_algorithm",
  "build_client_data",
  "build_model",
  "client_mesh",
  "constant_velocity",
  "data",
  "error_sums",
  "expand_spec",
  "fedavg",
  "fedgen",
  "heatmap",
  "heatmaps",
  "iterate_rounds",
  "label_weights",
  "load_traces",
  "lonlat_to_vec",
  "models",
  "mse",
  "no_motion",
  "normalize",
  "orthodromic_distance",
  "over_seeds",
  "parse_spec",
  "prepare",
  "read_spec",
  "resolve_device",
  "resume",
  "rotate",
  "round_key",
  "run",
  "run_rounds",
  "run_sweep",
  "sample_batches",
  "sample_labels",
  "seed_keys",
  "select_users",
  "shard_data",
  "shard_state",
  "split_clients",
  "state_shardings",
  "summarize",
  "summary_dict",
  "train",
  "vec_to_lonlat",
  "write_report",
]
