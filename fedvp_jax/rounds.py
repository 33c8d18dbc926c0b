"""The round loop: keys, rounds of a jitted ``apply``, per-round records and the seeds' final
summaries. It knows no files: the runner (:mod:`fedvp_jax.runner`) writes what it yields.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedvp_jax.algorithms.core import FederatedAlgorithm, over_seeds
from fedvp_jax.data.federated import ClientData
from fedvp_jax.errors import ConfigError
from fedvp_jax.experiment import Experiment
from fedvp_jax.metrics import summarize
from fedvp_jax.sharding import shard_state
from fedvp_jax.summaries import best_round, finite_or_none, round_record, summary_dict
from fedvp_jax.types import PRNGKey

Seeds = int | Sequence[int]
"""One seed, or several run as one vmapped program (state and metrics gain a seeds axis)."""


def seed_keys(seeds: Seeds) -> tuple[PRNGKey, PRNGKey]:
  """``(init_key, rounds_key)`` of every run: the two halves of ``split(key(seed))``; round r
  uses ``fold_in(rounds_key, r)``. With several seeds, both are ``key[seeds]``."""
  if np.ndim(seeds) == 0:
    init_key, rounds_key = jax.random.split(jax.random.key(int(seeds)))  # type: ignore[arg-type]
    return init_key, rounds_key
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
  return keys[:, 0], keys[:, 1]


def round_key(rounds_key: PRNGKey, r: int) -> PRNGKey:
  """Round ``r``'s key, for one ``rounds_key`` or a ``key[seeds]`` of them."""
  if rounds_key.ndim == 0:
    return jax.random.fold_in(rounds_key, r)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rounds_key, r)


def iterate_rounds(
  algorithm: FederatedAlgorithm,
  data: ClientData,
  seed: Seeds,
  rounds: int,
  mesh: Mesh | None = None,
  start: tuple[int, Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
  """Runs rounds of ``algorithm`` with its jitted ``apply``, yielding after each.

  The keys are the ones every run uses (:func:`seed_keys`), so the same seed gives the same
  run whichever loop drives it, and seed s of a vmapped group equals seed s run alone (up to
  float rounding).

  Args:
    algorithm: any :class:`~fedvp_jax.algorithms.FederatedAlgorithm`.
    data: the clients' windows.
    seed: the PRNG seed, or a sequence of seeds to run together with
      :func:`~fedvp_jax.algorithms.over_seeds` (state and metrics then have a leading seeds
      axis).
    rounds: the round to stop before (rounds ``0 .. rounds - 1``, from ``start``'s on).
    mesh: a ``"clients"`` mesh (see :mod:`fedvp_jax.sharding`) to split the clients' state
      over, matching ``data`` already placed on it; ``None`` for the default device.
    start: ``(round, state)`` to continue from (a restored checkpoint) instead of ``init``;
      the remaining rounds get the same keys as in an uninterrupted run.

  Yields:
    ``(state, metrics)`` after every round. A yielded state is valid until the next round
    starts: its buffers are donated to that round to save device memory.
  """
  seeds_axis = np.ndim(seed) > 0
  if seeds_axis:
    algorithm = over_seeds(algorithm)
  init_key, rounds_key = seed_keys(seed)
  first, state = start if start is not None else (0, jax.jit(algorithm.init)(init_key, data))
  if mesh is not None:
    state = shard_state(state, mesh, seeds_axis=seeds_axis)
  apply = jax.jit(algorithm.apply, donate_argnums=0)
  for r in range(first, rounds):
    state, metrics = apply(state, data, round_key(rounds_key, r))
    yield state, metrics


def run_rounds(
  algorithm: FederatedAlgorithm,
  data: ClientData,
  seed: Seeds,
  rounds: int,
  mesh: Mesh | None = None,
) -> Any:
  """The state after ``rounds`` rounds of ``algorithm`` (arguments as :func:`iterate_rounds`)."""
  if rounds < 1:
    raise ConfigError(f"rounds {rounds}: must be at least 1")
  # Drain the iterator, keeping only the last (state, metrics).
  ((state, _),) = collections.deque(iterate_rounds(algorithm, data, seed, rounds, mesh), maxlen=1)
  return state


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
  """What one round of :func:`train` produced.

  Attributes:
    round: the round (from 0).
    records: per seed, its JSON-ready metrics record (:func:`~fedvp_jax.summaries.round_record`
      with the round's ``seconds``).
    state: the state after the round, with the seeds axis; valid until the next round.
    diverged: when every training client of some seed had a non-finite update, what happened
      (the loop then stops), else ``None``.
  """

  round: int
  records: list[dict[str, Any]]
  state: Any
  diverged: str | None = None


def train(
  experiment: Experiment,
  seeds: Sequence[int],
  start: tuple[int, Any] | None = None,
  earlier: Sequence[Sequence[dict[str, Any]]] | None = None,
) -> Generator[RoundOutcome, None, list[dict[str, Any]]]:
  """Runs the experiment for ``seeds``, all at once as one vmapped program.

  Args:
    experiment: what to run.
    seeds: the PRNG seeds; the same seed gives the same run.
    start: ``(round, state)`` to continue from, see :func:`iterate_rounds` (the state has the
      seeds axis).
    earlier: per seed, the records of the rounds before ``start`` (for the best round).

  Yields:
    A :class:`RoundOutcome` after every round; after one that diverged, nothing more.

  Returns:
    Per seed, its summary: the final evaluation of the deployed models, the best evaluated
    round and timings (empty when a round diverged).
  """
  seeds = tuple(seeds)
  rounds = experiment.config.total_rounds
  data, algorithm = experiment.data, experiment.algorithm
  started = t0 = time.perf_counter()
  best = [best_round(records) for records in earlier or [[] for _ in seeds]]
  round_times = []
  state = None if start is None else start[1]
  first = 0 if start is None else start[0]
  rounds_iter = iterate_rounds(algorithm, data, seeds, rounds, experiment.mesh, start)
  for r, (state, on_device) in enumerate(rounds_iter, start=first):
    metrics = jax.device_get(on_device)
    round_times.append(time.perf_counter() - t0)
    per_seed = [jax.tree.map(lambda x, k=k: x[k], metrics) for k in range(len(seeds))]
    records = [{**round_record(r, m), "seconds": round_times[-1]} for m in per_seed]
    for k, record in enumerate(records):
      if record.get("test_loss") is not None and record["test_loss"] < best[k]["loss"]:
        best[k] = {"loss": record["test_loss"], "round": r}
    diverged = [
      seed
      for seed, record, m in zip(seeds, records, per_seed, strict=True)
      if len(record["excluded_clients"]) == len(m.selected)
    ]
    message = None
    if diverged:
      message = (
        f"round {r}, seed {diverged[0]}: every training client's update was non-finite (NaN or "
        "inf), so there is nothing to aggregate; the learning rate is probably too high "
        f"(learning_rate {experiment.config.learning_rate})"
      )
    yield RoundOutcome(r, records, state, message)
    if message:
      return []
    t0 = time.perf_counter()
  finals = jax.device_get(jax.jit(over_seeds(algorithm).evaluate)(state, data))
  wall = time.perf_counter() - started
  summaries = []
  for k, seed in enumerate(seeds):
    final = summarize(jax.tree.map(lambda x, k=k: x[k], finals))
    if float(final.loss) < best[k]["loss"]:
      best[k] = {"loss": float(final.loss), "round": rounds}
    summaries.append(
      {
        "seed": seed,
        "rounds": rounds,
        "final": summary_dict(final),
        "best_loss": finite_or_none(best[k]["loss"]),
        "best_round": best[k]["round"],
        "first_round_seconds": round_times[0] if round_times else None,
        "median_round_seconds": float(np.median(round_times[1:])) if len(round_times) > 1 else None,
        "wall_seconds": wall,
        "seeds_together": len(seeds),
      }
    )
  return summaries


__all__ = [
  "RoundOutcome",
  "Seeds",
  "iterate_rounds",
  "round_key",
  "run_rounds",
  "seed_keys",
  "train",
]
