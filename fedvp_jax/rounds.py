"""The round loop: keys, rounds of a jitted ``apply``, per-round records and the seeds' final
summaries. It knows no files: the runner (:mod:`fedvp_jax.runner`) writes what it yields.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedvp_jax import distributed
from fedvp_jax.algorithms.core import (
  FederatedAlgorithm,
  clients_state,
  config_state,
  over_configs,
  over_seeds,
  stack_configs,
)
from fedvp_jax.config import as_hyperparams
from fedvp_jax.data.federated import ClientData
from fedvp_jax.errors import ConfigError
from fedvp_jax.experiment import Experiment, baseline_summaries
from fedvp_jax.metrics import Summary, summarize
from fedvp_jax.sharding import replicate_keys, shard_state, state_shardings
from fedvp_jax.summaries import finite_or_none, round_record, summary_dict
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


def round_key(rounds_key: PRNGKey, r: int | jax.Array) -> PRNGKey:
  """Round ``r``'s key, for one ``rounds_key`` or a ``key[seeds]`` of them (``r`` may be
  traced)."""
  if rounds_key.ndim == 0:
    return jax.random.fold_in(rounds_key, r)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rounds_key, r)


def keyed_apply(algorithm: FederatedAlgorithm) -> Any:
  """``algorithm.apply`` taking the run's ``rounds_key`` instead of the round's key: the round's
  key (:func:`round_key` of the state's round counter) is derived inside the program, so a
  jitted round costs the host no key arithmetic.

  Returns:
    ``(state, data, rounds_key) -> (state, metrics)``; ``rounds_key`` is one key, or
    ``key[seeds]`` for an :func:`~fedvp_jax.algorithms.over_seeds` algorithm.
  """

  def apply(state: Any, data: ClientData, rounds_key: PRNGKey) -> Any:
    return algorithm.apply(state, data, round_key(rounds_key, clients_state(state).round))

  return apply


LONGEST_CHUNK = 10
"""The most rounds one jitted call runs (:func:`chunk_ends`): few enough that the progress bar
still moves every few seconds on a CPU, many enough that the host waits for the device only
once per chunk."""


def chunk_ends(
  first: int,
  rounds: int,
  must_end: Callable[[int], bool] | None = None,
  longest: int = LONGEST_CHUNK,
) -> list[int]:
  """Where the chunks of rounds ``first .. rounds - 1`` end, as rounds done: the first chunk
  is one round (it compiles, so its time is the compile's), a chunk ends where ``must_end(done)``
  (a checkpoint is due, or the state is needed to stop; ``None``: nowhere in particular) or
  after ``longest`` rounds, and the last at ``rounds``.

  >>> chunk_ends(0, 25, must_end=lambda done: done % 8 == 0)
  [1, 8, 16, 24, 25]
  """
  ends, size = [], 0
  for done in range(first + 1, rounds + 1):
    size += 1
    needed = must_end is not None and must_end(done)
    if done == first + 1 or done == rounds or size == longest or needed:
      ends.append(done)
      size = 0
  return ends


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Consecutive rounds run by one jitted call (:func:`iterate_chunks`).

  Attributes:
    first: its first round.
    count: how many rounds it ran.
    state: the state after its last round; valid until the next chunk starts (its buffers
      are donated to that chunk).
    metrics: every round's :class:`~fedvp_jax.algorithms.RoundMetrics`, leaves
      ``[longest, ...]`` (with a seeds axis after it over seeds), on the host; rows
      ``0 .. count - 1`` are this chunk's rounds, the rest zeros.
  """

  first: int
  count: int
  state: Any
  metrics: Any

  def round_metrics(self, i: int) -> Any:
    """Round ``first + i``'s metrics."""
    return jax.tree.map(lambda leaf: leaf[i], self.metrics)


def chunked_apply(algorithm: FederatedAlgorithm, longest: int) -> Any:
  """Up to ``longest`` rounds of :func:`keyed_apply` in one program (a ``lax.fori_loop`` whose
  trip count is an argument, so every chunk length up to ``longest`` shares one compile).

  Returns:
    ``(state, data, rounds_key, count) -> (state, metrics)``, ``metrics`` leaves
    ``[longest, ...]`` of which the first ``count`` rows are the rounds run.
  """
  apply = keyed_apply(algorithm)

  def run(state: Any, data: ClientData, rounds_key: PRNGKey, count: jax.Array) -> Any:
    shapes = jax.eval_shape(apply, state, data, rounds_key)[1]
    rows = jax.tree.map(lambda s: jnp.zeros((longest, *s.shape), s.dtype), shapes)

    def one_round(i: jax.Array, carry: Any) -> Any:
      state, rows = carry
      state, metrics = apply(state, data, rounds_key)
      return state, jax.tree.map(lambda row, m: row.at[i].set(m), rows, metrics)

    return jax.lax.fori_loop(0, count, one_round, (state, rows))

  return run


def iterate_chunks(
  algorithm: FederatedAlgorithm,
  data: ClientData,
  seed: Seeds,
  ends: Sequence[int],
  mesh: Mesh | None = None,
  start: tuple[int, Any] | None = None,
  program: Any = None,
) -> Iterator[Chunk]:
  """Runs rounds of ``algorithm`` in chunks, one jitted call and one read of the metrics by
  the host per chunk, yielding after each.

  The keys are the ones every run uses (:func:`seed_keys`), so the same seed gives the same
  run however the rounds are chunked, and seed s of a vmapped group equals seed s run alone
  (up to float rounding).

  Args:
    algorithm: any :class:`~fedvp_jax.algorithms.FederatedAlgorithm`.
    data: the clients' windows.
    seed: the PRNG seed, or a sequence of seeds to run together with
      :func:`~fedvp_jax.algorithms.over_seeds` (state and metrics then have a seeds axis).
    ends: increasing rounds done at which the chunks end (:func:`chunk_ends`); the last is
      the round to stop before.
    mesh: a ``"clients"`` mesh (see :mod:`fedvp_jax.sharding`) to split the clients' state
      over, matching ``data`` already placed on it; ``None`` for the default device.
    start: ``(round, state)`` to continue from (a restored checkpoint) instead of ``init``;
      the remaining rounds get the same keys as in an uninterrupted run.
    program: the chunk program already compiled (:func:`compile_chunks`, with the same
      arguments), instead of compiling it on the first chunk.

  Yields:
    A :class:`Chunk` after every chunk.
  """
  seeds_axis = np.ndim(seed) > 0
  if seeds_axis:
    algorithm = over_seeds(algorithm)
  init_key, rounds_key = seed_keys(seed)
  if mesh is not None:
    init_key, rounds_key = replicate_keys((init_key, rounds_key), mesh)
  if start is not None:
    first, state = start
    if mesh is not None:
      state = shard_state(state, mesh, seeds_axis=seeds_axis)
  else:
    # Created in place: a mesh over several processes' devices takes no host-made state.
    shapes = jax.eval_shape(algorithm.init, init_key, data)
    placement = None if mesh is None else state_shardings(shapes, mesh, seeds_axis=seeds_axis)
    first, state = 0, jax.jit(algorithm.init, out_shardings=placement)(init_key, data)
  bounds = [first, *ends]
  if program is None:
    longest = max((b - a for a, b in itertools.pairwise(bounds)), default=1)
    program = jax.jit(chunked_apply(algorithm, longest), donate_argnums=0)
  for done, end in itertools.pairwise(bounds):
    # The trip count as a replicated array: one compile for every length, and a program over
    # several processes' devices takes no host-made value.
    count = np.int32(end - done)
    if mesh is not None:
      count = jax.device_put(count, NamedSharding(mesh, PartitionSpec()))
    state, metrics = program(state, data, rounds_key, count)
    yield Chunk(done, end - done, state, distributed.fetch(metrics))


def compile_chunks(
  algorithm: FederatedAlgorithm, data: ClientData, seed: Seeds, longest: int = LONGEST_CHUNK
) -> Any:
  """The chunk program of :func:`iterate_chunks` on the default device (same arguments; chunks
  of up to ``longest`` rounds), compiled ahead of the first chunk from the state's shapes
  alone, so that its memory is known before any state exists:
  ``compile_chunks(...).memory_analysis()`` gives XLA's sizes of its arguments, outputs and
  temporaries."""
  grouped = over_seeds(algorithm) if np.ndim(seed) > 0 else algorithm
  init_key, rounds_key = seed_keys(seed)
  shapes = jax.eval_shape(grouped.init, init_key, data)
  count = jax.ShapeDtypeStruct((), jnp.int32)
  run = jax.jit(chunked_apply(grouped, longest), donate_argnums=0)
  return run.lower(shapes, data, rounds_key, count).compile()


def program_bytes(program: Any) -> int:
  """The memory a compiled program (:func:`compile_chunks`) takes, by XLA's memory analysis:
  its arguments, outputs and temporaries, outputs that reuse a donated argument's buffer
  counted once."""
  memory = program.memory_analysis()
  return int(
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )


def iterate_rounds(
  algorithm: FederatedAlgorithm,
  data: ClientData,
  seed: Seeds,
  rounds: int,
  mesh: Mesh | None = None,
  start: tuple[int, Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
  """Runs rounds of ``algorithm`` one jitted call each (:func:`iterate_chunks` with chunks of
  one round), yielding after each.

  Args:
    algorithm, data, seed, mesh, start: as :func:`iterate_chunks`.
    rounds: the round to stop before (rounds ``0 .. rounds - 1``, from ``start``'s on).

  Yields:
    ``(state, metrics)`` after every round, the metrics on the host. A yielded state is valid
    until the next round starts: its buffers are donated to that round to save device memory.
  """
  first = 0 if start is None else start[0]
  ends = list(range(first + 1, rounds + 1))
  for chunk in iterate_chunks(algorithm, data, seed, ends, mesh, start):
    yield chunk.state, chunk.round_metrics(0)


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
  # Drain the chunks, keeping only the last.
  chunks = iterate_chunks(algorithm, data, seed, chunk_ends(0, rounds), mesh)
  ((last,),) = [collections.deque(chunks, maxlen=1)]
  return last.state


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
  """What one round of :func:`train` (or of one run of :func:`train_group`) produced.

  Attributes:
    round: the round (from 0).
    records: per seed, its JSON-ready metrics record (:func:`~fedvp_jax.summaries.round_record`
      with the round's ``seconds``); empty in the outcome that ends a run.
    state: the run's state after the round, with the seeds axis, where a chunk of rounds
      (:func:`iterate_chunks`) ends (in a group of several runs: only where a checkpoint is
      due), else ``None``; valid until the next chunk starts.
    diverged: when some seed diverged (see :func:`diverged_models`, or every training client
      had a non-finite update), what happened (the run then stops), else ``None``.
    good_until: the newest round whose models are known good: the state after that many
      rounds passed the divergence check (-1: none yet, in a run continued from a checkpoint).
      Checkpoints of later rounds may hold diverged models.
    run: which run of :func:`train_group`'s ``experiments`` this is (0 for :func:`train`).
    summaries: in the run's last outcome, when it ended well: per seed, its summary (see
      :func:`train`); else ``None``.
  """

  round: int
  records: list[dict[str, Any]]
  state: Any
  diverged: str | None = None
  good_until: int = 0
  run: int = 0
  summaries: list[dict[str, Any]] | None = None


RANDOM_DIRECTION_DEG = 90.0
"""The mean great-circle error of a uniformly random direction, whatever the target."""


def diverged_models(summary: Summary) -> str | None:
  """Why models with these errors have diverged, or ``None`` when they have not: their loss is
  not finite, or their mean great-circle error over the horizon is no better than guessing a
  random direction (:data:`RANDOM_DIRECTION_DEG`; a collapsed model's zero vectors score 180°).
  Every trained model starts as straight-line extrapolation, far below that."""
  loss, degrees = float(summary.loss), float(np.mean(summary.orthodromic_deg))
  if not (math.isfinite(loss) and math.isfinite(degrees)):
    return "their loss is not finite"
  if degrees >= RANDOM_DIRECTION_DEG:
    return (
      f"their mean great-circle error, {degrees:.1f} deg, is no better than a random "
      f"direction's ({RANDOM_DIRECTION_DEG:.0f} deg)"
    )
  return None


class _Patience:
  """Counts, per seed, the evaluations since its validation loss last improved."""

  def __init__(self, num_seeds: int, patience: int | None):
    self.patience = patience
    self.best = [math.inf] * num_seeds
    self.since = [0] * num_seeds

  def update(self, records: Sequence[dict[str, Any]]) -> None:
    for k, record in enumerate(records):
      loss = record.get("validation_loss")
      if loss is None:
        continue
      if loss < self.best[k]:
        self.best[k], self.since[k] = loss, 0
      else:
        self.since[k] += 1

  @property
  def exhausted(self) -> bool:
    """Every seed has gone ``patience`` evaluations without a better validation loss."""
    return self.patience is not None and all(n >= self.patience for n in self.since)


def train(
  experiment: Experiment,
  seeds: Sequence[int],
  start: tuple[int, Any] | None = None,
  earlier: Sequence[Sequence[dict[str, Any]]] | None = None,
  checkpoint_every: int | None = None,
) -> Generator[RoundOutcome, None, list[dict[str, Any]]]:
  """Runs the experiment for ``seeds``, all at once as one vmapped program, in chunks of
  rounds (:func:`iterate_chunks`): the host reads the metrics once per chunk, and the outcomes
  of a chunk's rounds are yielded after it.

  With ``experiment.config.patience`` the rounds stop early once every seed has gone that many
  evaluations without a better validation loss.

  Args:
    experiment: what to run.
    seeds: the PRNG seeds; the same seed gives the same run.
    start: ``(round, state)`` to continue from, see :func:`iterate_rounds` (the state has the
      seeds axis).
    earlier: per seed, the records of the rounds before ``start`` (for early stopping).
    checkpoint_every: a chunk ends at every multiple of it, so the outcome of that round
      carries the state to checkpoint.

  Yields:
    A :class:`RoundOutcome` for every round; after one that diverged, nothing more. The
    models are checked for divergence (:func:`diverged_models`) at every evaluation and at the
    end; when only the final models fail, one last outcome without records says so.

  Returns:
    Per seed, its summary (empty when a round diverged): the ``final`` models' test errors,
    the ``selected`` ones' (chosen on validation, see
    :class:`~fedvp_jax.algorithms.core.Selected`; the final models when they validate
    better), and with new viewers the server's model on them; timings.
  """
  starts = None if start is None else (start[0], [start[1]])
  before = None if earlier is None else [earlier]
  for outcome in train_group([experiment], seeds, starts, before, checkpoint_every):
    if outcome.summaries is not None:
      return outcome.summaries
    yield outcome
  return []


def group_algorithm(experiments: Sequence[Experiment]) -> FederatedAlgorithm:
  """The program that runs ``experiments`` (configurations of equal
  :func:`~fedvp_jax.config.program_key`, on the same data) together: :func:`over_configs` of
  the :func:`leader`'s algorithm with what they differ in, each frozen after its own rounds; a
  single experiment's own algorithm."""
  if len(experiments) == 1:
    return experiments[0].algorithm
  configs = [e.config for e in experiments]
  return over_configs(
    leader(experiments).algorithm,
    as_hyperparams(configs),
    [config.total_rounds for config in configs],
  )


def leader(experiments: Sequence[Experiment]) -> Experiment:
  """The experiment whose algorithm a group runs for all (the others differ from it only in
  values its state holds): one whose server model is deployed, if any, so that the group can
  evaluate that model on new viewers for every run that has it."""
  return next((e for e in experiments if e.algorithm.evaluate_global is not None), experiments[0])


def train_group(
  experiments: Sequence[Experiment],
  seeds: Sequence[int],
  start: tuple[int, Sequence[Any]] | None = None,
  earlier: Sequence[Sequence[Sequence[dict[str, Any]]]] | None = None,
  checkpoint_every: int | None = None,
  program: Any = None,
  compile_seconds: float = 0.0,
) -> Iterator[RoundOutcome]:
  """Runs several runs, which differ only in settings held as values, as one program
  (:func:`group_algorithm`) for ``seeds``: :func:`train` for each, every run's outcomes equal
  to those of the run alone, up to float rounding. A run that diverges stops (its outcomes
  end) while the others go on; each run's last outcome carries its ``summaries`` (or says
  that its final models diverged).

  Args:
    experiments: the runs, of equal :func:`~fedvp_jax.config.program_key` and on the same
      data (:func:`~fedvp_jax.experiment.with_config`); several only on one device and without
      ``patience``.
    seeds: the PRNG seeds, shared by every run.
    start: ``(round, states)`` to continue from: every run's own state after that round (the
      seeds axis first), e.g. restored from its checkpoint.
    earlier: per run, per seed, the records of the rounds before ``start`` (early stopping).
    checkpoint_every: a chunk ends at every multiple of it, and the outcomes of that round
      carry the runs' states to checkpoint.
    program: the group's chunk program, already compiled (:func:`compile_chunks` of
      :func:`group_algorithm`).
    compile_seconds: how long compiling ``program`` took: counted in the first round's time,
      as a run that compiles in its first round counts it.

  Yields:
    Every run's :class:`RoundOutcome` for every round, in round order.

  Raises:
    ConfigError: for several runs with ``patience`` or split over devices.
  """
  seeds = tuple(seeds)
  runs = range(len(experiments))
  grouped = len(experiments) > 1
  head = experiments[0]
  configs = [e.config for e in experiments]
  if grouped and (head.mesh is not None or any(c.patience is not None for c in configs)):
    raise ConfigError(
      "runs split over devices or stopping early (patience) cannot share a program; run each alone"
    )
  totals = [config.total_rounds for config in configs]
  data, algorithm = head.data, group_algorithm(experiments)
  pick = functools.partial(config_state, seeds_axis=True) if grouped else lambda tree, c: tree
  started = t0 = time.perf_counter() - compile_seconds
  patience = _Patience(len(seeds), head.config.patience)
  for records in zip(*(earlier[0] if earlier else [[] for _ in seeds]), strict=True):
    patience.update(records)
  round_times: list[float] = []
  first = 0 if start is None else start[0]
  if start is not None:
    start = (first, stack_configs(start[1], seeds_axis=True) if grouped else start[1][0])
  # The untrained models are straight-line extrapolation, good by construction; a restored
  # state was never checked by this attempt (it may be the diverged one a run stopped at).
  good_until = [0 if start is None else -1 for _ in runs]
  live = list(runs)
  final = _FinalModels(experiments, seeds)
  if start is not None and first in totals:  # checkpointed after its last round, not summarised
    live = [c for c in runs if totals[c] > first]
    ended = [c for c in runs if totals[c] == first]
    yield from final.outcomes(start[1], ended, first, [], 0.0, good_until)
  every = head.config.round.eval_every

  def must_end(done: int) -> bool:
    # A checkpoint needs the state after its round; so does a run's end, and a stop for
    # patience, which follows an evaluated round (round done - 1).
    checkpoint = checkpoint_every is not None and done % checkpoint_every == 0
    stop = head.config.patience is not None and (done - 1) % every == 0
    return checkpoint or stop or done in totals

  ends = chunk_ends(first, max(totals), must_end) if live else []
  for chunk in iterate_chunks(algorithm, data, seeds, ends, head.mesh, start, program):
    seconds = (time.perf_counter() - t0) / chunk.count
    for i in range(chunk.count):
      r, metrics = chunk.first + i, chunk.round_metrics(i)
      round_times.append(seconds)
      # Runs' own states only where needed: slicing a group's state copies it.
      due = checkpoint_every is not None and (r + 1) % checkpoint_every == 0
      state = chunk.state if i == chunk.count - 1 and (due or not grouped) else None
      for c in [c for c in live if r < totals[c]]:
        outcome = _run_round(r, c, pick(metrics, c), seeds, seconds, experiments[c], good_until[c])
        good_until[c] = outcome.good_until
        if c == 0:
          patience.update(outcome.records)
        yield dataclasses.replace(outcome, state=None if state is None else pick(state, c))
        if outcome.diverged:
          live.remove(c)
      # Patience runs out only after an evaluated round, which ends its chunk (must_end).
      if patience.exhausted:
        totals[0] = r + 1
      ended = [c for c in live if totals[c] == r + 1]
      if ended:
        wall = time.perf_counter() - started
        yield from final.outcomes(chunk.state, ended, r + 1, round_times, wall, good_until)
        live = [c for c in live if c not in ended]
      if not live:
        return
    t0 = time.perf_counter()


def _run_round(
  r: int,
  run: int,
  metrics: Any,
  seeds: Sequence[int],
  seconds: float,
  experiment: Experiment,
  good_until: int,
) -> RoundOutcome:
  """Round ``r``'s outcome (without a state) for one run, from its metrics (``[seeds, ...]``,
  on the host): its records, and whether it diverged: some seed's evaluated models did, or
  every training client of some seed had a non-finite update."""
  per_seed = [jax.tree.map(lambda x, k=k: x[k], metrics) for k in range(len(seeds))]
  records = [{**round_record(r, m), "seconds": seconds} for m in per_seed]
  cause = _likely_cause(experiment)
  message = None
  if bool(per_seed[0].evaluated):
    # Judged on validation; without a validation split, on the test windows (a stop, never a
    # choice of model).
    has_validation = experiment.data.val_mask.shape[1] > 0
    checks = [_check(m.validation if has_validation else m.test) for m in per_seed]
    on = "validation" if has_validation else "test"
    message = _divergence(f"round {r}", seeds, checks, on, cause)
    good_until = r if message is None else good_until
  failed = [
    seed
    for seed, record, m in zip(seeds, records, per_seed, strict=True)
    if len(record["excluded_clients"]) == len(m.selected)
  ]
  if failed and message is None:
    message = (
      f"round {r}, seed {failed[0]}: every training client's update was non-finite (NaN "
      f"or inf), so there is nothing to aggregate; {cause}"
    )
  return RoundOutcome(r, records, None, message, good_until, run)


class _FinalModels:
  """Judges a group's final models, run by run, as each ends. Every run is evaluated on its
  own (the group's memory is sized for its rounds, not for evaluating all its runs at once),
  with the :func:`leader`'s evaluation, compiled once for the group: the runs' states differ
  only in the values they hold."""

  def __init__(self, experiments: Sequence[Experiment], seeds: Sequence[int]):
    self.experiments, self.seeds = experiments, seeds
    self.grouped = len(experiments) > 1
    first = leader(experiments)
    algorithm = over_seeds(first.algorithm)
    self.evaluate = jax.jit(algorithm.evaluate, static_argnums=(2, 3))
    self.on_new, self.new_baselines = None, None
    if first.new_viewers is not None and algorithm.evaluate_global is not None:
      self.on_new = jax.jit(algorithm.evaluate_global, static_argnums=2)
      self.new_baselines = {
        name: summary_dict(summary)
        for name, summary in baseline_summaries(first.new_viewers, first.spec.horizon).items()
      }

  def outcomes(
    self,
    state: Any,
    ending: Sequence[int],
    done: int,
    round_times: Sequence[float],
    wall: float,
    good_until: Sequence[int],
  ) -> Iterator[RoundOutcome]:
    """The last outcome of every run in ``ending``, which ended after ``done`` rounds: its
    summaries, or that its final models diverged."""
    for c in ending:
      experiment = self.experiments[c]
      mine = config_state(state, c, seeds_axis=True) if self.grouped else state
      data = experiment.data
      both = (False, True)
      evaluations: dict[str, Any] = {
        "test": {b: distributed.fetch(self.evaluate(mine, data, "test", b)) for b in both},
        "validation": distributed.fetch(self.evaluate(mine, data, "validation", False)),
        "new": None,
      }
      # Only runs whose own algorithm deploys the server's model are judged on new viewers.
      deploys = experiment.algorithm.evaluate_global is not None
      if deploys and self.on_new is not None:
        viewers = experiment.new_viewers
        evaluations["new"] = {b: distributed.fetch(self.on_new(mine, viewers, b)) for b in both}
      chosen = clients_state(mine).selected
      selected = distributed.fetch((chosen.from_round, chosen.validation_loss))
      new_baselines = self.new_baselines if deploys else None
      outcome, checks = _final_models(experiment, evaluations, selected, done, new_baselines)
      has_validation = data.val_mask.shape[1] > 0
      checked_on = "validation" if has_validation else "test"
      message = _divergence(
        f"after round {done - 1}", self.seeds, checks, checked_on, _likely_cause(experiment)
      )
      if message:  # the final models were never checked inside a round
        yield RoundOutcome(done - 1, [], None, message, good_until[c], c)
        continue
      rounds = experiment.config.total_rounds
      summaries = [
        {
          "seed": seed,
          "rounds": done,
          "stopped_early": done < rounds,
          **outcome[k],
          "first_round_seconds": round_times[0] if round_times else None,
          "median_round_seconds": (
            float(np.median(round_times[1:])) if len(round_times) > 1 else None
          ),
          "wall_seconds": wall,
          "seeds_together": len(self.seeds),
          **({"runs_together": len(self.experiments)} if self.grouped else {}),
        }
        for k, seed in enumerate(self.seeds)
      ]
      yield RoundOutcome(done - 1, [], None, None, good_until[c], c, summaries)


def _check(sums: Any) -> str | None:
  return diverged_models(summarize(sums))


def _divergence(
  when: str, seeds: Sequence[int], checks: Sequence[str | None], on: str, cause: str
) -> str | None:
  """The message for the first seed whose models failed their check, or ``None``."""
  for seed, why in zip(seeds, checks, strict=True):
    if why is not None:
      return f"{when}, seed {seed}: the models diverged: on the {on} windows {why}; {cause}"
  return None


def _likely_cause(experiment: Experiment) -> str:
  """What most likely made a run diverge, naming the settings to change."""
  lr = f"the learning rate is probably too high (learning_rate {experiment.config.learning_rate})"
  dp = experiment.privacy
  if dp is None:
    return lr
  return (
    f"{lr}, or the DP noise too strong for {dp.clients_per_round} clients a round (noise "
    f"multiplier {dp.noise_multiplier:.3g}, clip_norm {dp.clip_norm:g}: the mean update's "
    f"noise has std {dp.noise_multiplier * dp.clip_norm / dp.clients_per_round:.3g} per "
    "parameter)"
  )


def _final_models(
  experiment: Experiment,
  evaluations: dict[str, Any],
  selected: tuple[Any, Any],
  done: int,
  new_baselines: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[str | None]]:
  """Per seed: the final models' test errors and validation loss, and the selected ones' (the
  state's :class:`~fedvp_jax.algorithms.core.Selected`, or the final models where they
  validate at least as well), also on the new viewers; and per seed the final models'
  divergence check (:func:`diverged_models`, on validation, else on test).

  Args:
    experiment: the run.
    evaluations: its final state's error sums, every leaf ``[seeds, ...]`` on the host:
      ``"test"`` (by ``best``), ``"validation"`` and ``"new"`` (the server's model on the new
      viewers, by ``best``; ``None`` without them).
    selected: ``(from_round, validation_loss)`` of the state's selected models, ``[seeds]``.
    done: rounds run.
    new_baselines: the trivial predictors on the new viewers.
  """
  test, validation, new = evaluations["test"], evaluations["validation"], evaluations["new"]
  from_round, validation_loss = selected
  has_validation = experiment.data.val_mask.shape[1] > 0
  outcome, checks = [], []
  for k in range(len(from_round)):
    pick = lambda tree, k=k: jax.tree.map(lambda x: x[k], tree)
    checks.append(_check(pick(validation if has_validation else test[False])))
    final_validation = float(summarize(pick(validation)).loss) if has_validation else math.nan
    earlier = float(validation_loss[k])
    # The final models were never validated inside a round: they are selected when no earlier
    # round validated better (or there is no validation split, when selection is the final).
    keep_earlier = has_validation and int(from_round[k]) >= 0 and earlier < final_validation
    entry: dict[str, Any] = {
      "final": summary_dict(summarize(pick(test[False]))),
      "final_validation_loss": finite_or_none(final_validation),
      "selected": {
        "round": int(from_round[k]) if keep_earlier else done,
        "validation_loss": finite_or_none(earlier if keep_earlier else final_validation),
        **summary_dict(summarize(pick(test[keep_earlier]))),
      },
    }
    if new is not None:
      entry["new_viewers"] = {
        "viewers": len(experiment.new_users),
        "baselines": new_baselines,
        "final": summary_dict(summarize(pick(new[False]))),
        "selected": summary_dict(summarize(pick(new[keep_earlier]))),
      }
    outcome.append(entry)
  return outcome, checks


__all__ = [
  "LONGEST_CHUNK",
  "RANDOM_DIRECTION_DEG",
  "Chunk",
  "RoundOutcome",
  "Seeds",
  "chunk_ends",
  "chunked_apply",
  "compile_chunks",
  "diverged_models",
  "group_algorithm",
  "iterate_chunks",
  "iterate_rounds",
  "keyed_apply",
  "leader",
  "program_bytes",
  "round_key",
  "run_rounds",
  "seed_keys",
  "train",
  "train_group",
]
