"""An experiment: the data, model and algorithm a :class:`~fedvp_jax.config.RunConfig`
describes, assembled and ready to run, and the trivial predictors on the same test windows."""

from __future__ import annotations

import dataclasses
import warnings

import optax
from jax.sharding import Mesh

from fedvp_jax.algorithms.by_name import build_algorithm
from fedvp_jax.algorithms.core import FederatedAlgorithm
from fedvp_jax.baselines import BASELINES
from fedvp_jax.config import RunConfig
from fedvp_jax.data.datasets import DatasetSpec, load_traces, parse_spec
from fedvp_jax.data.federated import ClientData, EvalWindows, build_client_data, select_users
from fedvp_jax.data.protocols import client_candidates, first_window, new_viewer_windows
from fedvp_jax.metrics import Summary, error_sums, summarize
from fedvp_jax.models import build_model
from fedvp_jax.privacy import Accounting, account
from fedvp_jax.sharding import client_mesh, shard_data


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A configuration's data, model and algorithm, ready to run.

  Attributes:
    config: the configuration.
    spec: the parsed dataset spec.
    users: the viewers who are clients, client i being ``users[i]``.
    data: their windows on device.
    algorithm: the federated algorithm.
    mesh: the ``"clients"`` device mesh ``data`` is split over, or ``None`` (one device).
    new_users: the viewers who never train and test the server's model (see
      :mod:`fedvp_jax.data.protocols`).
    new_viewers: their test windows, one row per viewer, or ``None`` when there are none.
    privacy: the run's differential privacy (ε, δ, σ, ...), or ``None`` without DP.
  """

  config: RunConfig
  spec: DatasetSpec
  users: tuple[str, ...]
  data: ClientData
  algorithm: FederatedAlgorithm
  mesh: Mesh | None = None
  new_users: tuple[str, ...] = ()
  new_viewers: EvalWindows | None = None
  privacy: Accounting | None = None


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
  """The clients' optax optimizer at ``config.learning_rate``."""
  return {"sgd": optax.sgd, "adam": optax.adam}[config.optimizer](config.learning_rate)


OVERSIZED_BATCH = 4
"""A minibatch this many times the largest client's training windows is warned about."""


def _warn_oversized_batch(batch_size: int, most_windows: int) -> None:
  # Minibatches are drawn with replacement, so an oversized batch trains correctly but every
  # local step computes the whole batch, mostly repeats: far slower for nothing.
  if batch_size > OVERSIZED_BATCH * most_windows:
    warnings.warn(
      f"batch_size {batch_size} is {batch_size / most_windows:.0f}x the most training windows "
      f"any client holds ({most_windows}): every local step computes {batch_size} windows, "
      f"mostly repeats; a batch of at most {most_windows} is as good and far faster",
      stacklevel=3,
    )


def prepare(config: RunConfig) -> Experiment:
  """Loads the data and builds the model and algorithm that ``config`` describes.

  Raises:
    DataError, SettingError: for data that cannot serve ``config``.
  """
  spec = parse_spec(config.dataset)
  traces = load_traces(spec, config.data_dir, seed=config.seed)
  candidates = client_candidates(config.protocol, traces, spec)
  users = select_users(traces, config.num_clients, config.users, config.seed, candidates)
  data = build_client_data(
    traces,
    spec,
    users,
    config.split,
    config.seed,
    config.validation_fraction,
    first_window(config.protocol),
  )
  _warn_oversized_batch(config.round.batch_size, int(data.train_counts.max()))
  new_users, new_viewers = new_viewer_windows(
    config.protocol, traces, spec, users, config.split, config.seed
  )
  model = build_model(config.model, spec.history, spec.horizon, latent_dim=config.latent_dim)
  accounting = account(config, data.num_clients)
  privacy = config.privacy
  if accounting is not None:  # the algorithm runs with the noise multiplier the budget chose
    privacy = dataclasses.replace(
      privacy, noise_multiplier=accounting.noise_multiplier, target_epsilon=None
    )
  algorithm = build_algorithm(
    config.algorithm, model, make_optimizer(config), config.round, config.fedgen, privacy
  )
  mesh = None
  if config.devices is not None:
    mesh = client_mesh(config.devices)
    data = shard_data(data, mesh)
  return Experiment(config, spec, users, data, algorithm, mesh, new_users, new_viewers, accounting)


def baseline_summaries(windows: EvalWindows, horizon: int) -> dict[str, Summary]:
  """The trivial predictors' errors on ``windows`` (e.g. every client's ``data.test``)."""
  return {
    name: summarize(error_sums(predict(windows.x, horizon), windows.y, windows.mask))
    for name, predict in BASELINES.items()
  }


__all__ = ["Experiment", "baseline_summaries", "make_optimizer", "prepare"]
