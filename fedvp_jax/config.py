"""Every setting of a run, declared once: its type, default, help text, flag spellings and check.

Four frozen records hold the settings: :class:`RoundConfig` (what every algorithm's round
uses), :class:`FedGenConfig` (the FedGen family's), :class:`PrivacyConfig` (differential
privacy) and :class:`RunConfig` (the run: data, model, optimizer, rounds, seeds, placement,
with the other three inside). Each field carries its
:class:`Setting` in its metadata, and everything else is derived from them: the command
line's flags (:mod:`fedvp_jax.cli.flags`), a sweep spec's keys (:mod:`fedvp_jax.sweep`),
``config.json`` (:func:`to_record`, :func:`from_record`) and resume.

Settings are known by one flat name each (``beta``, ``local_steps``, ``alpha``; the records
never share a name), which is what spec files and :func:`with_settings` use. A value is
checked when a record is built, and only there: a bad one raises :class:`SettingError`
naming the quantity, never a flag; the command line maps that name onto its flag, a sweep onto
its spec file and key.

This module imports neither JAX nor NumPy, so ``--help`` and argument errors are immediate.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from fedvp_jax.errors import DataError, SettingError

# --- the vocabularies of the settings with named choices -------------------------------------


class AlgorithmSpec(NamedTuple):
  """What a named algorithm is.

  Attributes:
    send: what the server sends back: ``"full"``, ``"partial"`` (the head) or ``"none"``.
    generator: whether it trains FedGen's generator.
  """

  send: str
  generator: bool


ALGORITHMS = {
  "local": AlgorithmSpec("none", False),
  "fedavg": AlgorithmSpec("full", False),
  "partial-fedavg": AlgorithmSpec("partial", False),
  "fedgen": AlgorithmSpec("full", True),
  "local-fedgen": AlgorithmSpec("none", True),
  "partial-fedgen": AlgorithmSpec("partial", True),
}
"""Every algorithm by its name."""

RESEARCHER_NAMES = {
  "FedAvg": "fedavg",
  "partialFedAvg": "partial-fedavg",
  "FedGen": "fedgen",
  "localFedGen": "local-fedgen",
  "partialFedGen": "partial-fedgen",
}
"""The researcher's ``--algorithm`` names (FedGen's code base) and the algorithm each means."""

SEND_MODES = ("full", "partial", "none")
MODELS = ("lstm", "transformer")
GENERATORS = ("simple", "deep")
OPTIMIZERS = ("sgd", "adam")
SPLITS = ("video", "time")
PROTOCOLS = ("fedvp", "track")
AUGMENTATIONS = ("yaw", "none")
LOSSES = ("mse", "orthodromic")
LABEL_UPLOADS = ("points", "heatmap", "dp-heatmap")
MOTION_DIM = 6
"""Leading coordinates of the latent z holding the motion state: position (3), then
displacement (3) (see :mod:`fedvp_jax.models.head`), so ``latent_dim`` must exceed it."""

FLOAT32_MAX = 3.4028234663852886e38


# --- checks: each returns the reason a value is wrong, or None ------------------------------

Check = Callable[[Any], str | None]


def _at_least(minimum: int) -> Check:
  return lambda value: None if value >= minimum else f"must be at least {minimum}"


def _positive_float32(value: float) -> str | None:
  if 0 < value <= FLOAT32_MAX:
    return None
  return "must be a positive number that float32 holds (at most 3.4e38)"


def _non_negative_finite(value: float) -> str | None:
  return None if 0 <= value < math.inf else "must be a finite number >= 0"


def _in_unit_interval(value: float) -> str | None:
  return None if 0.0 < value <= 1.0 else "must be in (0, 1] (1 overwrites, smaller blends)"


def _validation_share(value: float) -> str | None:
  return None if 0.0 <= value <= 0.5 else "must be in [0, 0.5] (0: no validation split)"


def _positive_finite(value: float) -> str | None:
  return None if 0 < value < math.inf else "must be a finite number > 0"


def _in_open_unit_interval(value: float) -> str | None:
  return None if 0.0 < value < 1.0 else "must be in (0, 1)"


def _check_grain(grain: int) -> str | None:
  """The heatmap grid's ``grain``: an even integer of at least 4."""
  return None if grain >= 4 and grain % 2 == 0 else "must be an even integer >= 4"


def _check_dataset(name: str) -> str | None:
  from fedvp_jax.data.datasets import parse_spec  # imported here: it brings NumPy

  try:
    parse_spec(name)
  except DataError as err:
    return str(err)
  return None


def _check_users(users: tuple[str, ...]) -> str | None:
  if not users:
    return "the list of viewers is empty"
  if len(set(users)) < len(users):
    return "names a viewer twice"
  return None


def _check_latent_dim(value: int) -> str | None:
  return None if value > MOTION_DIM else f"must exceed {MOTION_DIM} (z starts with the motion)"


# --- declaring a setting ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
  """How one setting is spelled, explained and checked.

  Attributes:
    name: its flat name (the field's), as spec files and :func:`with_settings` use it.
    path: where it lives in a :class:`RunConfig`, e.g. ``("fedgen", "alpha")``.
    kind: ``int``, ``float``, ``str``, ``bool`` or ``tuple`` (of strings).
    optional: whether ``None`` is a value (it then means "not set", see the help).
    default: the default value.
    help: one line for ``--help``.
    flags: the command-line spellings; the first is the one ``--help`` shows. Each is also
      accepted with ``_`` for ``-`` and the other way round.
    legacy: names that older ``config.json`` files and spec files used besides the flags'
      (``local_epochs`` of ``--local-epochs`` is one already).
    choices: the allowed values, if they are named.
    aliases: other accepted spellings of choices (``FedAvg`` for ``fedavg``).
    check: returns why a value is wrong, or ``None``.
    placement: where the data lives or how clients are placed: changes nothing a run
      computes, so a resumed or reused run may differ in it.
    unrecorded: for a setting added after runs were already recorded, ``(value,)``: what a
      ``config.json`` without it means, i.e. how fedvp_jax ran before the setting existed,
      so an old run is resumed, reused and reported as it ran; ``()``: the default.
    traced: a value inside the compiled round, held in the state (the learning rates as
      ``optax.inject_hyperparams`` values, beta, FedGen's weights and schedule lengths): a new
      value never recompiles, and configurations that differ only in such settings (and in
      the algorithm's send mode) run as one program
      (:func:`~fedvp_jax.algorithms.over_configs`). Every other setting is static: it
      changes shapes or the program's structure.
  """

  name: str
  path: tuple[str, ...]
  kind: type
  optional: bool
  default: Any
  help: str
  flags: tuple[str, ...]
  legacy: tuple[str, ...] = ()
  choices: tuple[str, ...] | None = None
  aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  check: Check | None = None
  placement: bool = False
  unrecorded: tuple[Any, ...] = ()
  traced: bool = False

  @property
  def flag(self) -> str:
    """The spelling ``--help`` shows."""
    return self.flags[0]

  def coerce(self, value: Any, from_text: bool = False) -> Any:
    """``value`` (a TOML or JSON value, or with ``from_text`` a flag's text) as this setting
    holds it.

    Raises:
      SettingError: for a value of the wrong type.
    """
    if value is None and self.optional:
      return None
    if from_text and isinstance(value, str) and self.kind is not str:
      return self.coerce(self._parse_text(value))
    if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
      return float(value)  # TOML's `beta = 1`
    if self.kind is tuple and isinstance(value, list | tuple):
      if all(isinstance(item, str) for item in value):
        return tuple(value)
      raise SettingError(self.name, value, "should be a list of names")
    bool_for_int = isinstance(value, bool) and self.kind is not bool
    if not isinstance(value, self.kind) or bool_for_int:
      raise SettingError(self.name, value, f"should be {_KIND_NAMES[self.kind]}")
    if isinstance(value, str) and self.choices is not None:
      # Names are case-blind (``Transformer``); an unknown one is reported as given.
      named = self.aliases.get(value, value.lower())
      return named if named in self.choices else value
    return value

  def _parse_text(self, text: str) -> Any:
    try:
      if self.kind is tuple:
        return [item.strip() for item in text.split(",") if item.strip()]
      if self.kind is bool:
        return {"true": True, "false": False}[text.lower()]
      return self.kind(text)
    except (ValueError, KeyError):
      raise SettingError(self.name, text, f"should be {_KIND_NAMES[self.kind]}") from None

  def validate(self, value: Any) -> None:
    """Raises SettingError unless ``value`` (already coerced) is allowed."""
    if value is None:
      if not self.optional:
        raise SettingError(self.name, value, "must be given")
      return
    if self.choices is not None and value not in self.choices:
      raise SettingError(self.name, value, f"choose one of {', '.join(self.choices)}")
    reason = self.check(value) if self.check else None
    if reason:
      raise SettingError(self.name, value, reason)


_KIND_NAMES = {
  int: "an integer",
  float: "a number",
  str: "a string",
  bool: "true or false",
  tuple: "a list of names",
}


def _setting(
  default: Any,
  help: str,
  flags: tuple[str, ...] = (),
  *,
  legacy: tuple[str, ...] = (),
  choices: tuple[str, ...] | None = None,
  aliases: Mapping[str, str] | None = None,
  check: Check | None = None,
  placement: bool = False,
  unrecorded: tuple[Any, ...] = (),
  traced: bool = False,
) -> Any:
  """A dataclass field that is a setting (see :class:`Setting`; ``flags`` defaults to
  ``--<name>`` with dashes)."""
  declared = {
    "help": help,
    "flags": flags,
    "legacy": legacy,
    "choices": choices,
    "aliases": dict(aliases or {}),
    "check": check,
    "placement": placement,
    "unrecorded": unrecorded,
    "traced": traced,
  }
  return dataclasses.field(default=default, metadata={"setting": declared})


def _validate_fields(record: Any) -> None:
  """Checks every setting field of ``record`` (called by each record's ``__post_init__``)."""
  for field in dataclasses.fields(record):
    if "setting" in field.metadata:
      SCHEMA[field.name].validate(getattr(record, field.name))


# --- the records --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """The settings of a round that every algorithm shares.

  Attributes:
    send: what the server sends back: ``"full"``, ``"partial"`` (the head) or ``"none"``;
      implied by the algorithm's name (:data:`ALGORITHMS`), so not a setting of its own.
    beta: a client takes ``beta * server + (1 - beta) * own`` of what it receives.
    local_steps: minibatch steps per client per round (FedGen's "local epochs").
    batch_size: windows per minibatch.
    clients_per_round: clients sampled to train each round; ``None`` for all.
    eval_every: evaluate the deployed models every this many rounds.
    augment: ``"yaw"`` trains on every window turned about the vertical axis by a random
      angle (the same for its inputs and targets), ``"none"`` on the windows as they are.
    loss: the clients' training loss on their windows: ``"mse"`` of the unit vectors (the
      researcher's), or ``"orthodromic"``, the mean great-circle distance (the metric).
  """

  send: str = "full"
  beta: float = _setting(
    1.0, "clients take beta*server + (1-beta)*own", check=_in_unit_interval, traced=True
  )
  local_steps: int = _setting(
    10,
    "local minibatch steps per client per round; one 'epoch' is one minibatch, as in FedGen's code",
    ("--local-steps", "--local-epochs"),
    check=_at_least(1),
  )
  batch_size: int = _setting(64, "windows per minibatch", check=_at_least(1))
  clients_per_round: int | None = _setting(
    None, "clients sampled to train each round (default: all)", check=_at_least(1)
  )
  eval_every: int = _setting(1, "evaluate every k rounds (and after the last)", check=_at_least(1))
  # Why yaw by default: head motion does not depend on which way the viewer faces, but a model
  # that sees absolute directions learns the few training videos' layouts and gets worse on
  # new videos after a few rounds (docs/results.md: FedAvg with Adam on David).
  augment: str = _setting(
    "yaw",
    "train on windows turned about the vertical axis by a random angle (yaw), or as they are "
    "(none)",
    choices=AUGMENTATIONS,
    unrecorded=("none",),
  )
  # Why orthodromic by default: MSE of unit vectors weighs errors by their chord, not their
  # angle. Chosen on validation windows: FedAvg trained on the orthodromic loss has the lower
  # validation error at all 25 steps with SGD on David-m10-h25 and TRACK, and at most steps
  # with Adam (docs/results.md, "The training loss, decided on validation"; one seed).
  loss: str = _setting(
    "orthodromic",
    "the clients' training loss: mse of the unit vectors, or orthodromic (mean great-circle "
    "distance, the metric)",
    choices=LOSSES,
    unrecorded=("mse",),
  )

  def __post_init__(self) -> None:
    if self.send not in SEND_MODES:
      raise SettingError("send", self.send, f"choose one of {', '.join(SEND_MODES)}")
    _validate_fields(self)

  def check_clients(self, num_clients: int | None) -> None:
    """Raises SettingError when more clients per round are asked for than there are."""
    k = self.clients_per_round
    if k is not None and num_clients is not None and k > num_clients:
      raise SettingError("clients_per_round", k, f"exceeds the {num_clients} clients")


@dataclasses.dataclass(frozen=True)
class FedGenConfig:
  """FedGen's settings (defaults from FedGen's code and the researcher's runs).

  Attributes:
    generator: ``"simple"`` (FedGen's) or ``"deep"`` (residual MLP).
    embedding: condition G on a learned embedding of y's heatmap cell instead of y.
    grain: heatmap grid of ``grain`` longitude by ``grain / 2`` latitude cells.
    heatmap_sigma: Gaussian blur of the heatmaps, in degrees.
    gen_batch_size: generated labels per client step.
    gen_steps: generator Adam steps per round (FedGen: ensemble_epochs = 50).
    gen_learning_rate: the generator's initial learning rate. FedGen's ensemble_lr is 1e-4;
      on this regression task its generator then stays far from the clients' heads (teacher
      loss 0.057 after 40 rounds vs 0.005 at 1e-3, Synthetic-m10-h1, LSTM), so 1e-3.
    server_batch_size: labels per generator step; ``None`` uses the clients' batch size, as
      FedGen's server does.
    alpha: initial weight of the clients' generator term. FedGen's generative_alpha is 10,
      which swamps an MSE of ~1e-3 on unit vectors and made the models worse than the
      baselines here; 1 matched FedAvg (see docs/results.md). Chosen under ``loss="mse"``:
      the generator terms are MSE, and next to the orthodromic loss (radians, ~50x an MSE at
      0.2 s) they weigh about 1 % of a client's loss at alpha 1; not yet re-tuned for it.
    latent_weight: initial weight of FedGen's latent term (generative_beta); 0 turns it off.
    diversity_weight: weight of FedGen's diversity loss in G's objective (the researcher
      found 0, teacher loss only, clearly better).
    pretrain_rounds: rounds of stage one, before clients use the generator; they come before
      the run's ``rounds``.
    gen_warmup: rounds over which alpha_t ramps up from 0 after stage one.
    alpha_decay: per-round decay of alpha_t and the latent weight after stage one (FedGen's
      0.98; the generator's learning rate decays by 0.98 whatever it is).
    alpha_floor: the least alpha_t and the latent weight decay to (FedGen's 1e-4); a weight
      of 0 stays off.
    noise_dim: size of G's noise input.
    generator_hidden: G's hidden width.
  """

  generator: str = _setting("simple", "FedGen's generator: simple, or deep", choices=GENERATORS)
  embedding: bool = _setting(
    False, "condition the generator on a learned embedding of the label's heatmap cell"
  )
  grain: int = _setting(
    256, "heatmap grid: GRAIN longitude x GRAIN/2 latitude cells", check=_check_grain
  )
  heatmap_sigma: float = _setting(5.0, "heatmap blur in degrees", check=_positive_float32)
  gen_batch_size: int = _setting(256, "generated labels per client step", check=_at_least(1))
  gen_steps: int = _setting(50, "generator steps per round", check=_at_least(1))
  gen_learning_rate: float = _setting(
    1e-3,
    "generator Adam learning rate, decayed 0.98 per round (FedGen's: 1e-4)",
    ("--gen-learning-rate", "--ensemble-lr"),
    check=_positive_float32,
    traced=True,
  )
  server_batch_size: int | None = _setting(
    None,
    "labels per generator step (default: the clients' batch size, as FedGen's server)",
    check=_at_least(1),
  )
  alpha: float = _setting(
    1.0,
    "initial weight of the clients' generator term (FedGen's: 10)",
    ("--alpha", "--generative-alpha"),
    check=_non_negative_finite,
    traced=True,
  )
  latent_weight: float = _setting(
    0.0,
    "initial weight of FedGen's latent term; 0 is off",
    ("--latent-weight", "--generative-beta"),
    check=_non_negative_finite,
    traced=True,
  )
  diversity_weight: float = _setting(
    0.0, "weight of FedGen's diversity loss", check=_non_negative_finite, traced=True
  )
  pretrain_rounds: int = _setting(
    0,
    "stage-one rounds in which clients train without the generator while the server already "
    "trains it; they come before --rounds, so a run has pretrain + rounds rounds",
    ("--pretrain-rounds", "--pretrain-epochs"),
    check=_at_least(0),
    traced=True,
  )
  gen_warmup: int = _setting(
    0, "rounds over which alpha ramps up from 0 after stage one", check=_at_least(0), traced=True
  )
  alpha_decay: float = _setting(
    0.98,
    "per-round decay of alpha and the latent weight after stage one (FedGen's: 0.98)",
    check=_in_unit_interval,
    traced=True,
  )
  alpha_floor: float = _setting(
    1e-4,
    "the least alpha and the latent weight decay to (FedGen's: 1e-4)",
    check=_non_negative_finite,
    traced=True,
  )
  noise_dim: int = _setting(32, "size of the generator's noise input", check=_at_least(1))
  generator_hidden: int = _setting(
    256,
    "the generator's hidden width",
    ("--generator-hidden", "--gen-hidden"),
    legacy=("hidden",),
    check=_at_least(1),
  )

  def __post_init__(self) -> None:
    _validate_fields(self)


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """Client-level differential privacy: what clients upload, DP-FedAvg, the accounting.

  DP is on when ``noise_multiplier`` or ``target_epsilon`` is given; see
  :mod:`fedvp_jax.privacy` for the mechanisms and what ε covers.

  Attributes:
    label_upload: what FedGen's clients upload as labels: ``"points"`` (their viewpoints;
      the server builds the heatmaps), ``"heatmap"`` (each client builds its own heatmap and
      uploads only that) or ``"dp-heatmap"`` (the same, clipped to L2 norm
      ``heatmap_clip`` and noised with standard deviation ``noise_multiplier *
      heatmap_clip`` per cell before upload).
    noise_multiplier: σ: DP-FedAvg adds noise of standard deviation ``σ * clip_norm`` to the
      sum of the clipped updates (and dp-heatmap ``σ * heatmap_clip`` to every cell);
      ``None``: no DP unless ``target_epsilon`` picks σ.
    target_epsilon: choose σ so that the whole run spends this ε at ``delta``.
    delta: the δ of the (ε, δ) guarantee.
    clip_norm: C, the L2 norm each client's model update is clipped to.
    heatmap_clip: the L2 norm each client's uploaded heatmap (in viewpoint counts) is
      clipped to under ``dp-heatmap``.
  """

  label_upload: str = _setting(
    "points",
    "what FedGen's clients upload as labels: points (the viewpoints), heatmap (their own "
    "heatmap), dp-heatmap (clipped and noised heatmap)",
    choices=LABEL_UPLOADS,
  )
  noise_multiplier: float | None = _setting(
    None,
    "DP-FedAvg noise multiplier sigma: noise std sigma*C on the summed clipped updates "
    "(default: no DP)",
    check=_positive_finite,
  )
  target_epsilon: float | None = _setting(
    None,
    "DP: choose the noise multiplier so that the whole run spends this epsilon at --delta",
    check=_positive_finite,
  )
  delta: float = _setting(1e-5, "DP: the delta of (epsilon, delta)", check=_in_open_unit_interval)
  clip_norm: float = _setting(
    1e-3,
    "DP: L2 norm C each client's model update is clipped to (metrics.jsonl's dp_update_norm "
    "is the clients' mean norm before clipping)",
    check=_positive_finite,
  )
  heatmap_clip: float = _setting(
    1.0,
    "dp-heatmap: L2 norm each client's uploaded heatmap (viewpoint counts) is clipped to",
    check=_positive_finite,
  )

  def __post_init__(self) -> None:
    _validate_fields(self)
    if self.noise_multiplier is not None and self.target_epsilon is not None:
      raise SettingError(
        "target_epsilon", self.target_epsilon, "give either it or noise_multiplier, not both"
      )
    if self.label_upload == "dp-heatmap" and not self.enabled:
      raise SettingError(
        "label_upload", self.label_upload, "needs noise_multiplier or target_epsilon (DP on)"
      )

  @property
  def enabled(self) -> bool:
    """Whether the run is differentially private."""
    return self.noise_multiplier is not None or self.target_epsilon is not None

  def check_algorithm(self, algorithm: str) -> None:
    """Raises SettingError when DP cannot cover ``algorithm`` (a name of :data:`ALGORITHMS`):
    local training shares no model, and FedGen's labels must then be uploaded with noise."""
    if not self.enabled:
      return
    spec = ALGORITHMS[algorithm]
    if not spec.generator and spec.send == "none":
      raise SettingError(
        "noise_multiplier", self.noise_multiplier, "local training shares nothing to privatize"
      )
    if spec.generator and self.label_upload != "dp-heatmap":
      raise SettingError(
        "label_upload",
        self.label_upload,
        "with DP, FedGen's clients must upload dp-heatmap labels (anything else is not private)",
      )


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run.

  Attributes:
    algorithm: one of :data:`ALGORITHMS`.
    dataset: ``<Name>-m<M>-h<H>``.
    data_dir: the data root (``$FEDVP_DATA`` when ``None``).
    model: one of :data:`MODELS`.
    latent_dim: size of the encoder's output z.
    rounds: federated rounds (after FedGen's ``pretrain_rounds``, if any).
    optimizer: the clients' optimizer, one of :data:`OPTIMIZERS`.
    learning_rate: its learning rate.
    num_clients: clients drawn from the dataset's viewers (``users`` takes precedence).
    users: explicit viewer names, or ``None``.
    split: train/test split of each viewer's windows, one of :data:`SPLITS`.
    validation_fraction: the share of each client's training traces held out to validate
      (choose the deployed model, stop early); 0 for none.
    patience: stop once this many evaluations in a row found no better validation loss for
      any seed; ``None`` runs every round.
    protocol: ``"fedvp"`` (each client is tested on its own test windows; viewers who are not
      clients are the new viewers) or ``"track"`` (the published TRACK evaluation on David:
      M = 5, H = 25, windows from t = 6 s, the split files' train users as clients and their
      test pairs as new viewers).
    num_seeds: runs with seeds ``seed, seed + 1, ...``, together as one vmapped program.
    seed: seed of the first run; also draws the clients.
    devices: split the clients over this many devices (``None``: the default device only).
    round: the round's settings (``round.send`` follows ``algorithm``).
    fedgen: FedGen's settings (used by the FedGen family only).
    privacy: differential privacy and what clients upload.
  """

  algorithm: str = _setting(
    "fedavg",
    "local, fedavg, partial-fedavg, fedgen, local-fedgen or partial-fedgen (or the "
    "researcher's FedAvg, partialFedAvg, FedGen, localFedGen, partialFedGen)",
    ("--algorithm", "--algo"),
    choices=tuple(ALGORITHMS),
    aliases=RESEARCHER_NAMES,
  )
  dataset: str = _setting(
    "Synthetic-m10-h1",
    "<Name>-m<M>-h<H>: M past samples in, H future samples out, 0.2 s apart",
    check=_check_dataset,
  )
  data_dir: str | None = _setting(
    None, "data root holding dataset folders (default: $FEDVP_DATA)", placement=True
  )
  model: str = _setting("transformer", "the viewport model", choices=MODELS)
  latent_dim: int = _setting(32, "size of the latent z", check=_check_latent_dim)
  rounds: int = _setting(
    100, "federated rounds", ("--rounds", "--num-glob-iters"), check=_at_least(1)
  )
  optimizer: str = _setting("sgd", "the clients' optimizer", choices=OPTIMIZERS)
  learning_rate: float = _setting(
    0.01, "the clients' learning rate", check=_positive_float32, traced=True
  )
  num_clients: int | None = _setting(
    10,
    "viewers drawn (seeded) as clients (None, from Python or config.json: every viewer)",
    ("--num-clients", "--num-users"),
    check=_at_least(1),
  )
  users: tuple[str, ...] | None = _setting(
    None,
    "comma-separated viewer names to use as clients (instead of --num-clients)",
    check=_check_users,
  )
  split: str = _setting("video", "train/test split of each viewer's windows", choices=SPLITS)
  validation_fraction: float = _setting(
    0.2,
    "share of each client's training traces held out to validate: whole videos under the video "
    "split (when a client has 2 or more), else the end of each trace; 0 for none",
    check=_validation_share,
    unrecorded=(0.0,),
  )
  patience: int | None = _setting(
    None,
    "stop after this many evaluations without a better validation loss (default: never)",
    check=_at_least(1),
  )
  protocol: str = _setting(
    "fedvp",
    "evaluation protocol: fedvp (clients' own test windows), or track (the published TRACK "
    "protocol on David: M=5, H=25, windows from t=6 s, the split files' users)",
    choices=PROTOCOLS,
  )
  num_seeds: int = _setting(
    1,
    "runs with seeds seed, seed+1, ..., together; reports mean ± std",
    ("--num-seeds", "--times"),
    check=_at_least(1),
  )
  seed: int = _setting(0, "seed of the first run; also draws the clients", check=_at_least(0))
  devices: int | None = _setting(
    None,
    "split the clients over this many devices (default: one device)",
    check=_at_least(1),
    placement=True,
  )
  round: RoundConfig = dataclasses.field(default_factory=RoundConfig)
  fedgen: FedGenConfig = dataclasses.field(default_factory=FedGenConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)

  def __post_init__(self) -> None:
    _validate_fields(self)
    send = ALGORITHMS[self.algorithm].send
    if self.round.send != send:  # derived from the algorithm, never set on its own
      object.__setattr__(self, "round", dataclasses.replace(self.round, send=send))
    self.round.check_clients(self.clients)
    if self.patience is not None and self.validation_fraction == 0:
      raise SettingError(
        "patience", self.patience, "stops on the validation loss: needs validation_fraction > 0"
      )
    if self.protocol == "track" and self.split != "video":
      raise SettingError("protocol", self.protocol, "is defined on the video split only")

  @classmethod
  def of(cls, **settings: Any) -> RunConfig:
    """The defaults with ``settings`` by name (flat, legacy names accepted):
    ``RunConfig.of(algorithm="fedgen", beta=0.5, pretrain_rounds=50)``."""
    return with_settings(cls(), settings)

  def replace(self, **settings: Any) -> RunConfig:
    """This config with ``settings`` by name replaced (see :func:`with_settings`)."""
    return with_settings(self, settings)

  @property
  def clients(self) -> int | None:
    """How many clients the run has (``None``: every viewer of the dataset)."""
    return len(self.users) if self.users is not None else self.num_clients

  @property
  def uses_generator(self) -> bool:
    return ALGORITHMS[self.algorithm].generator

  @property
  def total_rounds(self) -> int:
    """Rounds the run does: FedGen's stage-one rounds, then ``rounds``."""
    return self.rounds + (self.fedgen.pretrain_rounds if self.uses_generator else 0)


# --- the schema: every setting, by name ------------------------------------------------------


def _settings_of(record_type: type, path: tuple[str, ...]) -> Iterator[Setting]:
  hints = typing.get_type_hints(record_type)
  for field in dataclasses.fields(record_type):
    declared = field.metadata.get("setting")
    if declared is None:
      if dataclasses.is_dataclass(hints[field.name]):
        yield from _settings_of(hints[field.name], (*path, field.name))
      continue
    kind, optional = _kind(hints[field.name])
    flags = declared["flags"] or ("--" + field.name.replace("_", "-"),)
    yield Setting(
      name=field.name,
      path=(*path, field.name),
      kind=kind,
      optional=optional,
      default=field.default,
      **{**declared, "flags": flags},
    )


def _kind(hint: Any) -> tuple[type, bool]:
  """``(kind, optional)`` of a field's type: ``int | None`` is ``(int, True)``."""
  args = typing.get_args(hint)
  if isinstance(hint, types.UnionType):
    (inner,) = [a for a in args if a is not type(None)]
    return _kind(inner)[0], True
  origin = typing.get_origin(hint)
  return (origin or hint), False


SCHEMA: dict[str, Setting] = {}
SCHEMA.update((s.name, s) for s in _settings_of(RunConfig, ()))
"""Every setting by its flat name, in declaration order (the order of ``--help``)."""

TRACED = tuple(name for name, s in SCHEMA.items() if s.traced)
"""The settings held as values inside the compiled round (:attr:`Setting.traced`)."""

_BY_LEGACY = {
  old: s.name
  for s in SCHEMA.values()
  for old in (*s.legacy, *(flag[2:].replace("-", "_") for flag in s.flags))
  if old != s.name
}


def resolve_name(name: str) -> str:
  """The setting's name for ``name`` (a name, or a legacy one).

  Raises:
    SettingError: for an unknown name, with the closest known one.
  """
  if name in SCHEMA:
    return name
  if name in _BY_LEGACY:
    return _BY_LEGACY[name]
  close = difflib.get_close_matches(name, list(SCHEMA) + list(_BY_LEGACY), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise SettingError(name, None, f"no such setting{hint}")


def require(name: str, value: Any) -> None:
  """Checks ``value`` of setting ``name``: for library functions that take a setting as an
  argument (``build_model(latent_dim=...)``), so that each check lives here alone.

  Raises:
    SettingError: naming the setting.
  """
  SCHEMA[name].validate(value)


def get(config: RunConfig, name: str) -> Any:
  """The value of setting ``name`` in ``config``."""
  value: Any = config
  for part in SCHEMA[name].path:
    value = getattr(value, part)
  return value


def with_settings(
  config: RunConfig, settings: Mapping[str, Any], from_text: bool = False
) -> RunConfig:
  """``config`` with ``settings`` (by name, legacy names accepted) replaced, every value
  coerced (from a flag's text with ``from_text``) and checked.

  Raises:
    SettingError: naming the setting, for an unknown name or a bad value.
  """
  changes: dict[str, dict[str, Any]] = {"": {}, "round": {}, "fedgen": {}, "privacy": {}}
  for given_name, value in settings.items():
    name = resolve_name(given_name)
    s = SCHEMA[name]
    changes[".".join(s.path[:-1])][name] = s.coerce(value, from_text)
  return dataclasses.replace(
    config,
    **changes[""],
    round=dataclasses.replace(config.round, **changes["round"]),
    fedgen=dataclasses.replace(config.fedgen, **changes["fedgen"]),
    privacy=dataclasses.replace(config.privacy, **changes["privacy"]),
  )


def to_record(config: RunConfig) -> dict[str, Any]:
  """``config`` as ``config.json`` holds it: every setting by name, JSON-ready."""
  return {name: list(v) if isinstance(v := get(config, name), tuple) else v for name in SCHEMA}


def from_record(record: Mapping[str, Any]) -> RunConfig:
  """The config a :func:`to_record` mapping describes.

  Also reads the records of fedvp_jax 0.1 (their ``algo``, ``times``, ``local_epochs``, ...
  and the nested ``fedgen`` table). A setting a record lacks takes the value it had before
  the setting existed (:attr:`Setting.unrecorded`), or else its default.

  Raises:
    SettingError: for an unknown name or a bad value.
  """
  flat = {k: v for k, v in record.items() if k not in ("fedgen", "round")}
  for table in ("fedgen", "round"):
    flat.update({k: v for k, v in record.get(table, {}).items() if k != "send"})
  recorded = {resolve_name(name) for name in flat}
  for name, s in SCHEMA.items():
    if s.unrecorded and name not in recorded:
      flat[name] = s.unrecorded[0]
  return with_settings(RunConfig(), flat)


def program_key(config: RunConfig) -> tuple[tuple[str, Any], ...]:
  """What decides ``config``'s compiled round: every static setting (not :attr:`Setting.traced`,
  not placement), with the algorithm reduced to its family (whether it trains a generator; the
  send mode is data, except under DP, where it decides what is clipped) and the number of rounds
  left out (a shorter run waits, frozen, in a longer one's program). Configurations with equal
  keys can run as one program (:func:`~fedvp_jax.algorithms.over_configs`)."""
  structure = [
    (name, get(config, name))
    for name, s in SCHEMA.items()
    if not s.traced and not s.placement and name not in ("algorithm", "rounds")
  ]
  family = "the FedGen family" if config.uses_generator else "the FedAvg family"
  if config.privacy.enabled:
    family += f", sending {config.round.send} under DP"
  return (*structure, ("algorithm", family))


def program_groups(configs: Sequence[RunConfig]) -> list[list[int]]:
  """The indices of ``configs`` grouped by :func:`program_key`, in order of first appearance:
  each group can run as one program."""
  groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
  for i, config in enumerate(configs):
    groups.setdefault(program_key(config), []).append(i)
  return list(groups.values())


def as_hyperparams(configs: Sequence[RunConfig]) -> dict[str, list[Any]]:
  """What ``configs`` differ in, as :func:`~fedvp_jax.algorithms.over_configs`' settings: every
  traced setting whose values differ, and the send mode where it differs.

  Raises:
    SettingError: when they differ in a static setting (see :func:`program_key`).
  """
  first = dict(program_key(configs[0]))
  for config in configs[1:]:
    for name, value in program_key(config):
      if value != first[name]:
        raise SettingError(
          name, value, f"differs from {first[name]!r}: it is static, so these need two programs"
        )
  varied = {
    name: [get(config, name) for config in configs]
    for name in TRACED
    if len({get(config, name) for config in configs}) > 1
  }
  sends = [config.round.send for config in configs]
  if len(set(sends)) > 1:
    varied["send"] = sends
  return varied


def differences(a: RunConfig, b: RunConfig) -> list[str]:
  """The settings (other than placement) in which ``a`` and ``b`` differ, as
  ``"name: a_value -> b_value"``."""
  return [
    f"{name}: {get(a, name)!r} -> {get(b, name)!r}"
    for name, s in SCHEMA.items()
    if not s.placement and get(a, name) != get(b, name)
  ]


__all__ = [
  "ALGORITHMS",
  "AUGMENTATIONS",
  "GENERATORS",
  "LABEL_UPLOADS",
  "LOSSES",
  "MODELS",
  "OPTIMIZERS",
  "PROTOCOLS",
  "RESEARCHER_NAMES",
  "SCHEMA",
  "SEND_MODES",
  "SPLITS",
  "TRACED",
  "AlgorithmSpec",
  "FedGenConfig",
  "PrivacyConfig",
  "RoundConfig",
  "RunConfig",
  "Setting",
  "as_hyperparams",
  "differences",
  "from_record",
  "get",
  "program_groups",
  "program_key",
  "require",
  "resolve_name",
  "to_record",
  "with_settings",
]
