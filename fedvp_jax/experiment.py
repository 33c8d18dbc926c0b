"""An experiment: the data, model and algorithm a :class:`~fedvp_jax.config.RunConfig`
describes, assembled and ready to run, and the trivial predictors on the same test windows."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fedvp_jax import distributed
from fedvp_jax.algorithms.by_name import build_algorithm
from fedvp_jax.algorithms.core import FederatedAlgorithm
from fedvp_jax.baselines import BASELINES
from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.data.datasets import DatasetSpec, load_traces, parse_spec
from fedvp_jax.data.federated import (
  ClientData,
  EvalWindows,
  build_client_data,
  select_users,
  stack_windows,
)
from fedvp_jax.data.protocols import (
  client_candidates,
  first_window,
  new_viewer_candidates,
  new_viewer_test,
  new_viewer_windows,
)
from fedvp_jax.data.traces import TraceSet
from fedvp_jax.data.windows import Windows, viewer_windows
from fedvp_jax.metrics import Summary, error_sums, summarize
from fedvp_jax.models import build_model
from fedvp_jax.privacy import Accounting, account
from fedvp_jax.sharding import assemble, client_mesh, local_rows, padded_rows, shard_data


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
  """The clients' optax optimizer at ``config.learning_rate``, an ``optax.inject_hyperparams``
  value in its state (so :func:`~fedvp_jax.algorithms.over_configs` can vary it)."""
  build = {"sgd": optax.sgd, "adam": optax.adam}[config.optimizer]
  return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(config.learning_rate)


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

  In a job of several processes (:mod:`fedvp_jax.distributed`) every process checks that the
  others run the same ``config``, and reads and holds only the traces of the clients (and new
  viewers) whose rows its devices hold (:func:`_process_rows`).

  Raises:
    DataError, SettingError: for data that cannot serve ``config``.
    JobError: when the processes of a job run different configurations.
  """
  spec = parse_spec(config.dataset)
  several = distributed.is_multiprocess()
  distributed.check_same(json.dumps(to_record(config), sort_keys=True), "configuration")
  mesh = client_mesh(config.devices) if config.devices is not None or several else None
  # Only the names of the dataset's viewers and videos, when each process reads its own.
  traces = load_traces(spec, config.data_dir, seed=config.seed, users=() if several else None)
  candidates = client_candidates(config.protocol, traces, spec)
  users = select_users(traces, config.num_clients, config.users, config.seed, candidates)
  if several:
    assert mesh is not None
    data, new_users, new_viewers = _process_rows(config, spec, traces, users, mesh)
  else:
    data = build_client_data(
      traces,
      spec,
      users,
      config.split,
      config.seed,
      config.validation_fraction,
      first_window(config.protocol),
    )
    new_users, new_viewers = new_viewer_windows(
      config.protocol, traces, spec, users, config.split, config.seed
    )
    if mesh is not None:
      data = shard_data(data, mesh)
  _warn_oversized_batch(config.round.batch_size, int(window_counts(data)["train"].max()))
  algorithm, accounting = _algorithm(config, spec, data.num_clients)
  return Experiment(config, spec, users, data, algorithm, mesh, new_users, new_viewers, accounting)


def with_config(experiment: Experiment, config: RunConfig) -> Experiment:
  """``experiment`` running ``config`` on the same data, its model and algorithm built anew.
  ``config`` must read the same data as ``experiment``'s (an equal
  :func:`~fedvp_jax.config.program_key`, as the runs of one group of a sweep have): that is
  what lets a group load its data once."""
  algorithm, accounting = _algorithm(config, experiment.spec, experiment.data.num_clients)
  return dataclasses.replace(experiment, config=config, algorithm=algorithm, privacy=accounting)


def _algorithm(
  config: RunConfig, spec: DatasetSpec, num_clients: int
) -> tuple[FederatedAlgorithm, Accounting | None]:
  """``config``'s algorithm and, with DP, its privacy accounting."""
  model = build_model(config.model, spec.history, spec.horizon, latent_dim=config.latent_dim)
  accounting = account(config, num_clients)
  privacy = config.privacy
  if accounting is not None:  # the algorithm runs with the noise multiplier the budget chose
    privacy = dataclasses.replace(
      privacy, noise_multiplier=accounting.noise_multiplier, target_epsilon=None
    )
  algorithm = build_algorithm(
    config.algorithm, model, make_optimizer(config), config.round, config.fedgen, privacy
  )
  return algorithm, accounting


def _process_rows(
  config: RunConfig, spec: DatasetSpec, catalogue: TraceSet, users: tuple[str, ...], mesh: Mesh
) -> tuple[ClientData, tuple[str, ...], EvalWindows | None]:
  """This process's part of the clients' windows and of the new viewers', as global arrays
  split over ``mesh``: it reads only the traces of the rows its devices hold. Window counts are
  padded to the largest over every process, so the arrays agree on their shapes."""
  rows = padded_rows(len(users), mesh)
  held = local_rows(rows, mesh)
  clients = [users[i] for i in held if i < len(users)]
  candidates = new_viewer_candidates(config.protocol, catalogue, users)
  viewer_rows = padded_rows(max(len(candidates), 1), mesh)
  viewers = [candidates[i] for i in local_rows(viewer_rows, mesh) if i < len(candidates)]
  traces = load_traces(spec, config.data_dir, seed=config.seed, users=[*clients, *viewers])
  none = Windows.concatenate([], spec.history, spec.horizon)
  parts = [
    viewer_windows(
      traces,
      user,
      spec.history,
      spec.horizon,
      config.split,
      config.seed,
      config.validation_fraction,
      first_window(config.protocol),
    )
    for user in clients
  ]
  parts += [(none, none, none)] * (len(held) - len(clients))
  longest = distributed.maximum([max(len(part[i]) for part in parts) for i in range(3)])
  train, validation, test = (
    assemble(stack_windows([part[i] for part in parts], int(longest[i])), mesh, rows)
    for i in range(3)
  )
  data = ClientData.of(train, validation, test, clients=len(users))

  tests = [
    new_viewer_test(config.protocol, traces, spec, user, config.split, config.seed)
    for user in viewers
  ]
  found = np.zeros(viewer_rows, np.int64)
  mine = local_rows(viewer_rows, mesh)
  found[[row for row, test in zip(mine, tests, strict=False) if test is not None]] = 1
  found = distributed.maximum(found)  # which candidates have test windows, on any process
  if not found.any():
    return data, (), None
  new_users = tuple(user for user, has in zip(candidates, found, strict=False) if has)
  per_viewer = [test if test is not None else none for test in tests]
  per_viewer += [none] * (len(mine) - len(per_viewer))
  longest_test = distributed.maximum([max(len(w) for w in per_viewer)])
  new_viewers = EvalWindows(
    *assemble(stack_windows(per_viewer, int(longest_test[0])), mesh, viewer_rows)
  )
  return data, new_users, new_viewers


def window_counts(data: ClientData) -> dict[str, np.ndarray]:
  """Every client's number of ``"train"``, ``"validation"`` and ``"test"`` windows, on the host
  (``int[clients]``, padding rows left out)."""
  counts = jax.jit(
    lambda d: {
      "train": d.train_mask.sum(axis=1),
      "validation": d.val_mask.sum(axis=1),
      "test": d.test_mask.sum(axis=1),
    }
  )(data)
  return {part: c[: data.num_clients] for part, c in distributed.fetch(counts).items()}


def baseline_summaries(windows: EvalWindows, horizon: int) -> dict[str, Summary]:
  """The trivial predictors' errors on ``windows`` (e.g. every client's ``data.test``)."""
  # One jitted program: a client axis split over several processes' devices takes no eager op.
  summaries = jax.jit(
    lambda w: {
      name: summarize(error_sums(predict(w.x, horizon), w.y, w.mask))
      for name, predict in BASELINES.items()
    }
  )(windows)
  return distributed.fetch(summaries)


__all__ = [
  "Experiment",
  "baseline_summaries",
  "make_optimizer",
  "prepare",
  "window_counts",
  "with_config",
]
