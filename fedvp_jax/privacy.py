"""Differential privacy of a run: which mechanisms it uses, and ε for the whole run.

A DP run (``--noise-multiplier`` or ``--target-epsilon``, see
:class:`~fedvp_jax.config.PrivacyConfig`) releases two things per round, both computed by the
clients that train that round (``clients_per_round`` of the ``N`` clients, drawn without
replacement, or all of them):

* **DP-FedAvg** (every algorithm but ``local``): each client's model update (its trained
  params minus the params it started the round from; only the head under ``partial`` send
  and for localFedGen) is clipped to L2 norm C, the server sums the clipped updates, adds
  Gaussian noise of standard deviation σ·C and divides by the number of selected clients.
* **dp-heatmap** (the FedGen family, which must use it under DP): each client clips the
  heatmap of this round's training targets (in viewpoint counts) to L2 norm B and adds
  Gaussian noise of standard deviation σ·B to every cell before upload. The server sets
  negative cells to zero, which is post-processing and costs no privacy.

Neighbouring runs differ in one client's whole data (client-level, *replace-one* adjacency,
which fixed-size client sampling needs). Replacing a client moves the sum of clipped updates
by at most 2C and a clipped, non-negative heatmap by at most √2·B, so the two mechanisms are
Gaussian mechanisms with noise multipliers σ/2 and σ/√2 relative to their sensitivities. One
round is their composition on the sampled clients; the run is that round composed over every
round (FedGen's pretraining rounds included). ε at δ comes from Google's ``dp-accounting``
(its RDP accountant, which handles sampling without replacement); no accountant is written
here. Under add-or-remove adjacency the same σ would give a smaller ε.

What ε does not cover: the simulation's evaluation of every client's model on its own test
windows (a measurement a real deployment would not publish), and what a client keeps locally.

This module imports no JAX; ``dp_accounting`` is imported when a run is accounted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fedvp_jax.config import ALGORITHMS, RunConfig
from fedvp_jax.errors import SettingError

UPDATE_SENSITIVITY = 2.0
"""Replace-one L2 sensitivity of the sum of updates clipped to norm 1."""

HEATMAP_SENSITIVITY = math.sqrt(2.0)
"""Replace-one L2 sensitivity of one non-negative heatmap clipped to norm 1."""

MAX_NOISE_MULTIPLIER = 1e4
"""The largest σ ``--target-epsilon`` may choose; a target it cannot reach is an error."""

ACCOUNTANT = "RDP (dp-accounting), replace-one client adjacency"


@dataclasses.dataclass(frozen=True)
class Accounting:
  """The privacy of one run, as ``config.json`` and ``summary.json`` record it.

  Attributes:
    epsilon: ε of the whole run at ``delta``.
    delta: δ.
    noise_multiplier: σ (given, or chosen for ``target_epsilon``).
    clip_norm: C, the bound on each client's update.
    heatmap_clip: B, the bound on each uploaded heatmap; ``None`` without dp-heatmap.
    rounds: rounds composed.
    num_clients: N, the clients the round samples from.
    clients_per_round: K, the clients sampled each round without replacement.
    target_epsilon: the ε asked for, or ``None``.
  """

  epsilon: float
  delta: float
  noise_multiplier: float
  clip_norm: float
  heatmap_clip: float | None
  rounds: int
  num_clients: int
  clients_per_round: int
  target_epsilon: float | None = None

  @property
  def sampling_rate(self) -> float:
    return self.clients_per_round / self.num_clients

  def record(self) -> dict[str, Any]:
    """JSON-ready: the fields, the sampling and the accountant."""
    return {
      **dataclasses.asdict(self),
      "sampling": "all clients"
      if self.clients_per_round == self.num_clients
      else "fixed-size, without replacement",
      "sampling_rate": self.sampling_rate,
      "accountant": ACCOUNTANT,
    }

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> Accounting:
    """The accounting a :meth:`record` holds."""
    return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})

  def describe(self) -> str:
    """One line for the end of a run."""
    heat = "" if self.heatmap_clip is None else f", heatmap clip {self.heatmap_clip:g}"
    return (
      f"DP: epsilon {self.epsilon:.3f} at delta {self.delta:g} over {self.rounds} rounds "
      f"(noise multiplier {self.noise_multiplier:.4g}, clip {self.clip_norm:g}{heat}, "
      f"{self.clients_per_round} of {self.num_clients} clients per round)"
    )


def dp_event(
  noise_multiplier: float,
  rounds: int,
  num_clients: int,
  clients_per_round: int,
  heatmap: bool,
) -> Any:
  """The ``dp_accounting`` event of a whole run (see the module doc).

  Args:
    noise_multiplier: σ.
    rounds: rounds composed.
    num_clients: N.
    clients_per_round: K ≤ N, sampled without replacement each round.
    heatmap: whether clients also upload dp-heatmaps.
  """
  import dp_accounting

  mechanisms = [dp_accounting.GaussianDpEvent(noise_multiplier / UPDATE_SENSITIVITY)]
  if heatmap:
    mechanisms.append(dp_accounting.GaussianDpEvent(noise_multiplier / HEATMAP_SENSITIVITY))
  one_round: Any = dp_accounting.ComposedDpEvent(mechanisms)
  if clients_per_round < num_clients:
    one_round = dp_accounting.SampledWithoutReplacementDpEvent(
      num_clients, clients_per_round, one_round
    )
  return dp_accounting.SelfComposedDpEvent(one_round, rounds)


def epsilon(event: Any, delta: float) -> float:
  """ε at ``delta`` of a :func:`dp_event`, from the RDP accountant."""
  from dp_accounting import NeighboringRelation
  from dp_accounting.rdp import RdpAccountant

  accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
  return float(accountant.compose(event).get_epsilon(delta))


def noise_for_epsilon(
  target_epsilon: float,
  delta: float,
  rounds: int,
  num_clients: int,
  clients_per_round: int,
  heatmap: bool,
) -> float:
  """The smallest σ whose run spends at most ``target_epsilon`` (within 1e-4 in ε's terms).

  Raises:
    SettingError: for ``target_epsilon`` when no σ up to :data:`MAX_NOISE_MULTIPLIER`
      reaches it.
  """
  from dp_accounting import ExplicitBracketInterval, NeighboringRelation, calibrate_dp_mechanism
  from dp_accounting.rdp import RdpAccountant

  def event(sigma: float) -> Any:
    return dp_event(sigma, rounds, num_clients, clients_per_round, heatmap)

  if epsilon(event(MAX_NOISE_MULTIPLIER), delta) > target_epsilon:
    raise SettingError(
      "target_epsilon",
      target_epsilon,
      f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches it in {rounds} rounds with "
      f"{clients_per_round} of {num_clients} clients per round at delta {delta:g}; ask for a "
      "larger epsilon or delta, fewer rounds or fewer clients per round",
    )
  sigma = calibrate_dp_mechanism(
    lambda: RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE),
    event,
    target_epsilon,
    delta,
    ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
    tol=1e-6,
  )
  # Brent's root may sit a hair below the exact σ: round up so that ε never exceeds the target.
  while epsilon(event(sigma), delta) > target_epsilon:
    sigma *= 1.0 + 1e-6
  return float(sigma)


def account(config: RunConfig, num_clients: int) -> Accounting | None:
  """The privacy of ``config`` run on ``num_clients`` clients; ``None`` when DP is off.

  Raises:
    SettingError: when DP cannot cover the algorithm, or no σ reaches ``target_epsilon``.
  """
  privacy = config.privacy
  if not privacy.enabled:
    return None
  privacy.check_algorithm(config.algorithm)
  heatmap = ALGORITHMS[config.algorithm].generator
  k = config.round.clients_per_round or num_clients
  rounds = config.total_rounds
  if privacy.target_epsilon is not None:
    sigma = noise_for_epsilon(
      privacy.target_epsilon, privacy.delta, rounds, num_clients, k, heatmap
    )
  else:  # DP is on, so one of the two is given
    sigma = float(privacy.noise_multiplier)  # type: ignore[arg-type]
  spent = epsilon(dp_event(sigma, rounds, num_clients, k, heatmap), privacy.delta)
  return Accounting(
    epsilon=spent,
    delta=privacy.delta,
    noise_multiplier=sigma,
    clip_norm=privacy.clip_norm,
    heatmap_clip=privacy.heatmap_clip if heatmap else None,
    rounds=rounds,
    num_clients=num_clients,
    clients_per_round=k,
    target_epsilon=privacy.target_epsilon,
  )


__all__ = [
  "ACCOUNTANT",
  "HEATMAP_SENSITIVITY",
  "MAX_NOISE_MULTIPLIER",
  "UPDATE_SENSITIVITY",
  "Accounting",
  "account",
  "dp_event",
  "epsilon",
  "noise_for_epsilon",
]
