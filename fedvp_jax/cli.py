"""The settings of a run as command-line flags, shared by ``scripts/train.py`` and
``scripts/sweep.py``, and settings given by name (a sweep's spec file, its overrides).

Every flag's ``dest`` is the name of a :class:`~fedvp_jax.training.RunConfig` field or of a
:class:`~fedvp_jax.algorithms.FedGenConfig` field (the two never share a name), so one flat
``{name: value}`` mapping describes any change to a configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedvp_jax.algorithms import ALGORITHMS, RESEARCHER_NAMES, FedGenConfig
from fedvp_jax.data.windows import SPLITS
from fedvp_jax.errors import ConfigError
from fedvp_jax.models import MODELS
from fedvp_jax.models.generator import GENERATORS
from fedvp_jax.training import OPTIMIZERS, RunConfig

RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "fedgen")
FEDGEN_FIELDS = tuple(f.name for f in dataclasses.fields(FedGenConfig))
SETTINGS = RUN_FIELDS + FEDGEN_FIELDS
"""Every setting's name, as flags' ``dest`` and spec-file keys use it."""


def algorithm_name(text: str) -> str:
  """Our algorithm names, or the researcher's (``FedAvg``, ``partialFedGen``, ...)."""
  name = RESEARCHER_NAMES.get(text, text.lower())
  if name not in ALGORITHMS:
    known = sorted(set(ALGORITHMS) | set(RESEARCHER_NAMES))
    raise argparse.ArgumentTypeError(
      f"unknown algorithm {text!r}; choose one of {', '.join(known)}"
    )
  return name


def model_name(text: str) -> str:
  if text.lower() not in MODELS:
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose one of {', '.join(MODELS)}")
  return text.lower()


def beta_value(text: str) -> float:
  value = float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(
      f"{text}: beta must be in (0, 1] (1 overwrites, smaller blends)"
    )
  return value


def at_least(minimum: int):
  def parse(text: str) -> int:
    value = int(text)
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{text}: must be at least {minimum}")
    return value

  return parse


def positive_float(text: str) -> float:
  value = float(text)
  if not 0 < value < math.inf:
    raise argparse.ArgumentTypeError(f"{text}: must be a positive, finite number")
  return value


def non_negative_float(text: str) -> float:
  value = float(text)
  if not 0 <= value < math.inf:
    raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0")
  return value


def run_name(text: str) -> str:
  """A run directory name: one plain path component, so --overwrite can only replace it."""
  if not text or text in (".", "..") or "/" in text or "\\" in text:
    raise argparse.ArgumentTypeError(
      f"{text!r}: must be a plain folder name (no '/', not '.' or '..')"
    )
  return text


def user_list(text: str) -> tuple[str, ...]:
  users = tuple(u.strip() for u in text.split(",") if u.strip())
  if not users:
    raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated viewer names")
  return users


def add_config_arguments(p: argparse.ArgumentParser) -> None:
  """Adds a flag for every :data:`SETTINGS` name to ``p``, with validation and defaults."""
  p.add_argument(
    "--algo",
    "--algorithm",
    dest="algo",
    type=algorithm_name,
    default="fedavg",
    help=f"{', '.join(ALGORITHMS)} (or FedAvg, partialFedAvg, FedGen, ...)",
  )
  p.add_argument(
    "--dataset",
    default="Synthetic-m10-h1",
    help="<Name>-m<M>-h<H>: M past samples in, H future samples out, 0.2 s apart "
    "(default %(default)s)",
  )
  p.add_argument(
    "--data-dir",
    "--data_dir",
    dest="data_dir",
    help="data root holding dataset folders (default: $FEDVP_DATA)",
  )
  p.add_argument(
    "--model",
    type=model_name,
    default="transformer",
    help="lstm or transformer (default %(default)s)",
  )
  p.add_argument(
    "--rounds",
    "--num_glob_iters",
    dest="rounds",
    type=at_least(1),
    default=100,
    help="federated rounds (default %(default)s)",
  )
  p.add_argument(
    "--local_epochs",
    "--local-epochs",
    dest="local_epochs",
    type=at_least(1),
    default=10,
    help="local minibatch steps per client per round; one 'epoch' is one minibatch, as in "
    "FedGen's code (default %(default)s)",
  )
  p.add_argument(
    "--batch_size",
    "--batch-size",
    dest="batch_size",
    type=at_least(1),
    default=64,
    help="windows per minibatch (default %(default)s)",
  )
  p.add_argument(
    "--learning_rate",
    "--learning-rate",
    dest="learning_rate",
    type=positive_float,
    default=0.01,
    help="client learning rate (default %(default)s)",
  )
  p.add_argument(
    "--optimizer", choices=OPTIMIZERS, default="sgd", help="client optimizer (default %(default)s)"
  )
  p.add_argument(
    "--num_users",
    "--num-users",
    dest="num_users",
    type=at_least(1),
    default=10,
    help="viewers drawn as clients, seeded (default %(default)s)",
  )
  p.add_argument(
    "--users",
    type=user_list,
    help="comma-separated viewer names to use as clients (overrides --num_users)",
  )
  p.add_argument(
    "--clients-per-round",
    "--clients_per_round",
    dest="clients_per_round",
    type=at_least(1),
    help="clients sampled to train each round (default: all)",
  )
  p.add_argument(
    "--beta",
    type=beta_value,
    default=1.0,
    help="clients take beta*server + (1-beta)*own (default %(default)s)",
  )
  p.add_argument(
    "--split",
    choices=SPLITS,
    default="video",
    help="train/test split of each viewer's windows (default %(default)s)",
  )
  p.add_argument(
    "--latent-dim",
    "--latent_dim",
    dest="latent_dim",
    type=at_least(7),
    default=32,
    help="size of the latent z (default %(default)s)",
  )
  p.add_argument(
    "--eval-every",
    "--eval_every",
    dest="eval_every",
    type=at_least(1),
    default=1,
    help="evaluate every k rounds (default %(default)s)",
  )
  p.add_argument(
    "--times",
    type=at_least(1),
    default=1,
    help="repeat with seeds seed, seed+1, ...; reports mean ± std (default %(default)s)",
  )
  p.add_argument(
    "--seed", type=at_least(0), default=0, help="seed of the first run (default %(default)s)"
  )
  p.add_argument(
    "--devices",
    type=at_least(1),
    help="split the clients over this many devices of that kind (default: one device)",
  )
  g = p.add_argument_group(
    "FedGen", "used by fedgen, local-fedgen and partial-fedgen; accepted by every algorithm"
  )
  g.add_argument(
    "--generator",
    choices=GENERATORS,
    default="simple",
    help="simple (FedGen's) or deep (residual MLP)",
  )
  g.add_argument(
    "--embedding",
    action="store_true",
    help="condition the generator on a learned embedding of the label's heatmap cell",
  )
  g.add_argument(
    "--grain",
    type=at_least(4),
    default=256,
    help="heatmap grid: GRAIN longitude x GRAIN/2 latitude cells (default %(default)s)",
  )
  g.add_argument(
    "--heatmap-sigma",
    "--heatmap_sigma",
    dest="heatmap_sigma",
    type=positive_float,
    default=5.0,
    help="heatmap blur in degrees (default %(default)s)",
  )
  g.add_argument(
    "--gen_batch_size",
    "--gen-batch-size",
    dest="gen_batch_size",
    type=at_least(1),
    default=256,
    help="generated labels per client step (default %(default)s)",
  )
  g.add_argument(
    "--gen-steps",
    "--gen_steps",
    dest="gen_steps",
    type=at_least(1),
    default=50,
    help="generator steps per round (default %(default)s)",
  )
  g.add_argument(
    "--gen-learning-rate",
    "--ensemble_lr",
    dest="gen_learning_rate",
    type=positive_float,
    default=1e-3,
    help="generator Adam learning rate, decayed 0.98 per round (FedGen: 1e-4; default %(default)s)",
  )
  g.add_argument(
    "--alpha",
    "--generative_alpha",
    dest="alpha",
    type=non_negative_float,
    default=1.0,
    help="initial weight of the clients' generator term (FedGen: 10; default %(default)s)",
  )
  g.add_argument(
    "--latent-weight",
    "--generative_beta",
    dest="latent_weight",
    type=non_negative_float,
    default=0.0,
    help="initial weight of FedGen's latent term; 0 is off (default %(default)s)",
  )
  g.add_argument(
    "--diversity-weight",
    "--diversity_weight",
    dest="diversity_weight",
    type=non_negative_float,
    default=0.0,
    help="weight of FedGen's diversity loss (default %(default)s)",
  )
  g.add_argument(
    "--pretrain-epochs",
    "--pretrain_epochs",
    dest="pretrain_epochs",
    type=at_least(0),
    default=0,
    help="stage-one rounds in which clients train without the generator while the server "
    "already trains it; added before --rounds (default %(default)s)",
  )
  g.add_argument(
    "--gen-warmup",
    "--gen_warmup",
    dest="gen_warmup",
    type=at_least(0),
    default=0,
    help="rounds over which alpha ramps up from 0 after stage one (default %(default)s)",
  )
  g.add_argument(
    "--server-batch-size",
    "--server_batch_size",
    dest="server_batch_size",
    type=at_least(1),
    help="labels per generator step (default: the clients' --batch_size, as FedGen's server)",
  )
  g.add_argument(
    "--noise-dim",
    "--noise_dim",
    dest="noise_dim",
    type=at_least(1),
    default=32,
    help="size of the generator's noise input (default %(default)s)",
  )
  g.add_argument(
    "--gen-hidden",
    dest="hidden",
    type=at_least(1),
    default=256,
    help="the generator's hidden width (default %(default)s)",
  )


def config_from_args(args: argparse.Namespace) -> RunConfig:
  """The :class:`RunConfig` of a namespace parsed with :func:`add_config_arguments`."""
  fedgen = FedGenConfig(**{name: getattr(args, name) for name in FEDGEN_FIELDS})
  return RunConfig(**{name: getattr(args, name) for name in RUN_FIELDS}, fedgen=fedgen)


def config_overrides(argv: Sequence[str]) -> dict[str, Any]:
  """The settings that ``argv`` gives explicitly (validated as the flags are), by name."""
  # No abbreviations: other scripts' flags pass through here, and --device must not be read
  # as --devices.
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  add_config_arguments(parser)
  # argparse fills in a default only where the namespace lacks the name, so a namespace that
  # starts with a marker everywhere tells given settings from defaults.
  absent = object()
  given, _ = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(SETTINGS, absent)))
  return {name: value for name, value in vars(given).items() if value is not absent}


# Settings whose default is None, so their type cannot be read off the default.
_OPTIONAL_TYPES: dict[str, type] = {
  "data_dir": str,
  "num_users": int,
  "users": tuple,
  "clients_per_round": int,
  "devices": int,
  "server_batch_size": int,
}


def _typed(name: str, given: Any, source: str) -> Any:
  """``given`` as setting ``name`` holds it: names as the flags read them (``FedAvg``,
  ``Transformer``), ints where floats go, lists as tuples; a wrong type is a ConfigError."""
  if name == "algo" and isinstance(given, str):
    given = RESEARCHER_NAMES.get(given, given.lower())
  if name == "model" and isinstance(given, str):
    given = given.lower()
  if isinstance(given, list):
    given = tuple(given)
  default = getattr(RunConfig(), name, None) if name in RUN_FIELDS else None
  if name in FEDGEN_FIELDS:
    default = getattr(FedGenConfig(), name)
  expected = _OPTIONAL_TYPES.get(name, type(default))
  integer = isinstance(given, int) and not isinstance(given, bool)
  if expected is float and integer:
    return float(given)  # TOML's `beta = 1`
  if given is not None and (not isinstance(given, expected) or (integer and expected is bool)):
    raise ConfigError(f"{source}: {name} = {given!r} should be of type {expected.__name__}")
  if isinstance(given, tuple) and not all(isinstance(item, str) for item in given):
    raise ConfigError(f"{source}: {name} = {given!r} should be a list of names")
  return given


def with_settings(config: RunConfig, settings: Mapping[str, Any], source: str) -> RunConfig:
  """``config`` with ``settings`` (names from :data:`SETTINGS`) replaced.

  Raises:
    ConfigError: naming ``source`` and the setting, for an unknown name or a bad value.
  """
  run_fields: dict[str, Any] = {}
  fedgen_fields: dict[str, Any] = {}
  for name, given in settings.items():
    if name not in SETTINGS:
      close = difflib.get_close_matches(name, SETTINGS, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"{source}: unknown setting {name!r}{hint}")
    value = _typed(name, given, source)
    (fedgen_fields if name in FEDGEN_FIELDS else run_fields)[name] = value
  try:
    fedgen = dataclasses.replace(config.fedgen, **fedgen_fields)
    changed = dataclasses.replace(config, **run_fields, fedgen=fedgen)
    changed.check()
  except (ConfigError, TypeError, ValueError) as err:
    raise ConfigError(f"{source}: {err}") from err
  return changed


__all__ = [
  "FEDGEN_FIELDS",
  "RUN_FIELDS",
  "SETTINGS",
  "add_config_arguments",
  "algorithm_name",
  "at_least",
  "beta_value",
  "config_from_args",
  "config_overrides",
  "model_name",
  "non_negative_float",
  "positive_float",
  "run_name",
  "user_list",
  "with_settings",
]
