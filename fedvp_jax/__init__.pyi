from . import algorithms, config, data, heatmap, models, privacy
from .algorithms import (
  ClientsState,
  FederatedAlgorithm,
  FedGenState,
  RoundMetrics,
  aggregate,
  build_algorithm,
  fedavg,
  fedgen,
  local_update,
  over_configs,
  over_seeds,
  prediction_loss,
  receive,
  weighted_mean,
)
from .baselines import BASELINES, best_trivial, constant_velocity, linear_extrapolation, no_motion
from .config import (
  ALGORITHMS,
  FedGenConfig,
  PrivacyConfig,
  RoundConfig,
  RunConfig,
  with_settings,
)
from .data.datasets import DatasetSpec, load_traces, parse_spec
from .data.federated import ClientData, build_client_data, select_users
from .errors import ConfigError, DataError, DivergenceError, FedVPError, JobError, SettingError
from .experiment import Experiment, prepare
from .geometry import (
  lonlat_to_vec,
  normalize,
  orthodromic_distance,
  rotate,
  turn_about_vertical,
  vec_to_lonlat,
)
from .heatmap import heatmaps, label_weights, sample_labels
from .metrics import (
  ErrorSums,
  Summary,
  error_sums,
  mse,
  orthodromic_loss,
  summarize,
  training_loss,
)
from .models import Model, build_model
from .privacy import Accounting, account
from .report import write_report
from .rounds import iterate_rounds, run_rounds
from .runner import resume, run
from .sharding import client_mesh, shard_data
from .sweep import expand_spec, read_spec, run_sweep

__version__: str

__all__ = [
  "ALGORITHMS",
  "BASELINES",
  "Accounting",
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
  "JobError",
  "Model",
  "PrivacyConfig",
  "RoundConfig",
  "RoundMetrics",
  "RunConfig",
  "SettingError",
  "Summary",
  "account",
  "aggregate",
  "algorithms",
  "best_trivial",
  "build_algorithm",
  "build_client_data",
  "build_model",
  "client_mesh",
  "config",
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
  "linear_extrapolation",
  "load_traces",
  "local_update",
  "lonlat_to_vec",
  "models",
  "mse",
  "no_motion",
  "normalize",
  "orthodromic_distance",
  "orthodromic_loss",
  "over_configs",
  "over_seeds",
  "parse_spec",
  "prediction_loss",
  "prepare",
  "privacy",
  "read_spec",
  "receive",
  "resume",
  "rotate",
  "run",
  "run_rounds",
  "run_sweep",
  "sample_labels",
  "select_users",
  "shard_data",
  "summarize",
  "training_loss",
  "turn_about_vertical",
  "vec_to_lonlat",
  "weighted_mean",
  "with_settings",
  "write_report",
]
