"""What both ends of a Flower run build from the run's :class:`~fedvp_jax.config.RunConfig`:
the model, the clients' optimizer and local update (FedGen's parts), and the config's
fingerprint, with the same builders the vmapped rounds use (:mod:`fedvp_jax.experiment`,
:mod:`fedvp_jax.algorithms`). No Flower here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

import jax
import optax

from fedvp_jax.algorithms.client import LocalUpdate
from fedvp_jax.algorithms.fedavg import fedavg_update
from fedvp_jax.algorithms.fedgen import FedGenParts, fedgen_parts
from fedvp_jax.config import ALGORITHMS, RoundConfig, RunConfig, from_record, to_record
from fedvp_jax.data.datasets import DatasetSpec, load_traces, parse_spec
from fedvp_jax.data.federated import ClientData, build_client_data, select_users
from fedvp_jax.data.protocols import client_candidates, first_window
from fedvp_jax.data.traces import TraceSet
from fedvp_jax.errors import ConfigError, DataError
from fedvp_jax.experiment import make_optimizer
from fedvp_jax.models import Model, build_model


def fingerprint(config: RunConfig) -> str:
  """A short hash of every setting but placement (where data lives): two ends with the same
  fingerprint compute the same run."""
  from fedvp_jax.config import SCHEMA, get

  record = {name: get(config, name) for name, s in SCHEMA.items() if not s.placement}
  text = json.dumps(record, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_json(config: RunConfig) -> str:
  """``config`` as the JSON text of ``config.json`` (:func:`~fedvp_jax.config.to_record`)."""
  return json.dumps(to_record(config), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Setup:
  """A run's pieces, built once per process and configuration.

  Attributes:
    config: the run's configuration.
    round: its round settings, ``send`` as the algorithm implies.
    spec: the dataset spec.
    model: the viewport model.
    optimizer: the clients' optimizer.
    update: the clients' local update (:data:`~fedvp_jax.algorithms.LocalUpdate`).
    fedgen: FedGen's parts, or ``None`` for the FedAvg family.
    fingerprint: :func:`fingerprint` of ``config``.
  """

  config: RunConfig
  round: RoundConfig
  spec: DatasetSpec
  model: Model
  optimizer: optax.GradientTransformation
  update: LocalUpdate
  fedgen: FedGenParts | None
  fingerprint: str

  @property
  def label_batch_size(self) -> int:
    """FedGen's label batch per step (0 for the FedAvg family)."""
    return self.config.fedgen.gen_batch_size if self.fedgen is not None else 0

  def params_like(self) -> Any:
    """The shapes and dtypes of the model's params (``jax.ShapeDtypeStruct`` leaves)."""
    return jax.eval_shape(self.model.init, jax.random.key(0))

  def sent_like(self, first: bool) -> Any:
    """What the server sends each round (shapes): the whole model in the first round (every
    client starts from it), then what ``round.send`` says: all, the head, or nothing."""
    like = self.params_like()
    if first or self.round.send == "full":
      return like
    if self.round.send == "partial":
      return {"head": like["head"]}
    return {}


def build_setup(config: RunConfig) -> Setup:
  """The :class:`Setup` of ``config`` (cached per config).

  Raises:
    ConfigError: for settings a Flower run does not support (differential privacy, devices,
      several seeds, early stopping).
  """
  return _build(config_json(config))


@functools.lru_cache(maxsize=8)
def _build(text: str) -> Setup:
  config = from_record(json.loads(text))
  if config.privacy.enabled:
    raise ConfigError(
      "differential privacy is not supported by the Flower apps yet; run it with `fedvp train`"
    )
  if config.devices is not None:
    raise ConfigError("devices: a Flower client trains alone; leave devices unset")
  if config.num_seeds != 1:
    raise ConfigError("num_seeds: a Flower run is one seed; run each seed as its own run")
  if config.patience is not None:
    raise ConfigError("patience: early stopping is not supported by the Flower apps yet")
  spec = parse_spec(config.dataset)
  model = build_model(config.model, spec.history, spec.horizon, latent_dim=config.latent_dim)
  optimizer = make_optimizer(config)
  round_config = dataclasses.replace(config.round, send=ALGORITHMS[config.algorithm].send)
  parts = None
  if config.uses_generator:
    parts = fedgen_parts(model, optimizer, round_config, config.fedgen, config.privacy)
    update = parts.update
  else:
    update = fedavg_update(model, optimizer, round_config)
  return Setup(config, round_config, spec, model, optimizer, update, parts, fingerprint(config))


def run_users(config: RunConfig) -> tuple[str, ...]:
  """The viewers who are the run's clients, client i being ``users[i]``, drawn as
  :func:`~fedvp_jax.experiment.prepare` draws them."""
  return run_dataset(config)[1]


def run_dataset(config: RunConfig) -> tuple[TraceSet, tuple[str, ...]]:
  """The whole dataset (from ``config.data_dir``: the server's) and the run's viewers
  (:func:`run_users`), every check of ``fedvp train`` made."""
  spec = parse_spec(config.dataset)
  traces = load_traces(spec, config.data_dir, seed=config.seed)
  candidates = client_candidates(config.protocol, traces, spec)
  users = select_users(traces, config.num_clients, config.users, config.seed, candidates)
  return traces, users


def catalogue(traces: TraceSet) -> dict[str, Any]:
  """What a client holding one viewer's traces needs to know of the whole dataset to window
  and split them as the vmapped run does (JSON-ready): its name, ``videos`` (a seeded video
  split draws from all of them), ``users`` and ``split`` (the split files' pairs, or
  ``None``)."""
  split = traces.split
  pairs = None if split is None else {k: [list(p) for p in v] for k, v in split.items()}
  return {
    "name": traces.name,
    "videos": list(traces.videos),
    "users": list(traces.users),
    "split": pairs,
  }


def viewer_traces(own: TraceSet, user: str, known: dict[str, Any], where: str) -> TraceSet:
  """``user``'s traces from ``own`` (a folder of this viewer's traces, or the whole dataset)
  within the dataset that ``known`` (:func:`catalogue`, the server's) describes.

  Raises:
    DataError: naming ``where`` (the folder), when it holds no trace of ``user``, a video the
      dataset has not, or is another dataset.
  """
  if own.name != known["name"]:
    raise DataError(f"{where}: holds dataset {own.name!r}, the server runs {known['name']!r}")
  if user not in known["users"]:
    raise DataError(f"{where}: viewer {user!r} is not in the server's dataset {known['name']}")
  mine = {key: trace for key, trace in own.traces.items() if key[1] == user}
  if not mine:
    raise DataError(
      f"{where}: no trace of viewer {user!r} (expected sampled_dataset/<video>/{user})"
    )
  unknown = sorted({video for video, _ in mine} - set(known["videos"]))
  if unknown:
    raise DataError(
      f"{where}: viewer {user!r} has traces of video(s) {', '.join(unknown)}, which the "
      f"server's dataset {known['name']} has not"
    )
  split = known["split"]
  return TraceSet(
    own.name,
    tuple(known["videos"]),
    tuple(known["users"]),
    mine,
    None if split is None else {k: tuple(tuple(p) for p in v) for k, v in split.items()},
  )


def own_data(
  config: RunConfig,
  user: str,
  data_dir: str | None = None,
  known: dict[str, Any] | None = None,
) -> ClientData:
  """One client's windows (a clients axis of 1, unpadded): ``user``'s traces alone, from
  ``data_dir`` (its own folder, which may hold this viewer's traces only; ``config.data_dir``
  when ``None``), windowed and split as :func:`~fedvp_jax.experiment.prepare` does within the
  dataset ``known`` describes (:func:`catalogue`; the folder's when ``None``). Only this
  viewer's trace files are read, and the folder's split files are not: the split is
  ``known``'s."""
  spec = parse_spec(config.dataset)
  folder = data_dir or config.data_dir
  if known is None:
    traces = load_traces(spec, folder, seed=config.seed)
  else:
    own = load_traces(spec, folder, seed=config.seed, users=[user], split_files=False)
    where = "the data folder" if folder is None else f"data-dir {folder}"
    traces = viewer_traces(own, user, known, where)
  return build_client_data(
    traces,
    spec,
    [user],
    config.split,
    config.seed,
    config.validation_fraction,
    first_window(config.protocol),
  )


__all__ = [
  "Setup",
  "build_setup",
  "catalogue",
  "config_json",
  "fingerprint",
  "own_data",
  "run_dataset",
  "run_users",
  "viewer_traces",
]
