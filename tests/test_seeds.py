"""Repeats over seeds: one vmapped program equals the seeds run one after another; a run that
diverges keeps, and names, its last good checkpoint."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN as TINY
from conftest import compiles

from fedvp_jax import rounds, runner
from fedvp_jax.algorithms import FederatedAlgorithm, over_seeds, seed_axes
from fedvp_jax.errors import DivergenceError
from fedvp_jax.experiment import prepare
from fedvp_jax.rounds import run_rounds
from fedvp_jax.rundir import RunDir
from fedvp_jax.runner import run


def run_seeds(experiment, run_dir, checkpoint_every):
  """The runner's loop over an experiment's seeds, into an existing folder, drained."""
  return runner.drain(runner._run_alone(experiment, RunDir(run_dir), checkpoint_every, False, {}))


@pytest.mark.parametrize("algo", ["fedavg", "partial-fedgen"])
def test_vmapped_seeds_equal_seeds_run_one_by_one(algo):
  experiment = prepare(TINY.replace(algorithm=algo, clients_per_round=2))
  together = run_rounds(experiment.algorithm, experiment.data, (4, 7), 3)
  for k, seed in enumerate((4, 7)):
    alone = run_rounds(experiment.algorithm, experiment.data, seed, 3)
    seed_k = jax.tree.map(
      lambda x, axis, k=k: x if axis is None else x[k], together, seed_axes(together)
    )
    chex.assert_trees_all_close(seed_k, alone, rtol=5e-4, atol=1e-6)
  # The seeds really differ, so the comparison above is not between copies of one run.
  leaves = jax.tree.leaves(together.client_params if algo == "fedavg" else together.clients)
  assert any(not np.allclose(leaf[0], leaf[1], rtol=1e-3, atol=0) for leaf in leaves)


@pytest.mark.parametrize("algo", ["fedavg", "fedgen"])
def test_vmapped_seeds_keep_the_rounds_conds(algo):
  """Evaluation every k rounds and FedGen's stage one are lax.conds on the round counter; over
  seeds they must stay conds, not become selects that compute both branches every round."""
  experiment = prepare(TINY.replace(algorithm=algo, eval_every=1000))
  algorithm, data = over_seeds(experiment.algorithm), experiment.data
  keys = jax.random.split(jax.random.key(0), 2)
  state = algorithm.init(keys, data)
  clients = state.clients if algo == "fedgen" else state
  assert clients.round.shape == ()
  program = str(jax.make_jaxpr(algorithm.apply)(state, data, keys))  # nested jaxprs included
  assert program.count(" cond[") >= (2 if algo == "fedgen" else 1)


def test_round_keys_are_derived_inside_the_jitted_round():
  """The host passes the run's rounds key; each round's key comes from the state's round
  counter inside the program, and equals the key of that round."""
  experiment = prepare(TINY)
  algorithm, data = experiment.algorithm, experiment.data
  init_key, rounds_key = rounds.seed_keys(0)
  state = algorithm.init(init_key, data)
  at_five = state.replace(round=jnp.asarray(5, state.round.dtype))
  got, _ = jax.jit(rounds.keyed_apply(algorithm))(at_five, data, rounds_key)
  want, _ = jax.jit(algorithm.apply)(at_five, data, rounds.round_key(rounds_key, 5))
  chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("algo", ["fedavg", "fedgen"])
def test_the_rounds_compile_once_and_keys_stay_on_device(algo, monkeypatch):
  """round_key runs only while the round is traced, never on the host; and the chunk program
  compiles once for chunks of every length, if the state init builds has the types every
  round returns (a weak-typed init once compiled the round twice, 9-11 s of a Transformer
  run's start)."""
  experiment = prepare(TINY.replace(algorithm=algo))
  on_host = []
  real = rounds.round_key
  monkeypatch.setattr(
    rounds,
    "round_key",
    lambda key, r: on_host.append(r) if not isinstance(r, jax.core.Tracer) else real(key, r),
  )
  with compiles("run") as compiled:
    chunks = rounds.iterate_chunks(experiment.algorithm, experiment.data, [0, 1], [1, 4, 5])
    assert [chunk.count for chunk in chunks] == [1, 3, 1]
  assert on_host == [], "round keys were derived on the host"
  assert len(compiled) == 1, compiled


def test_times_writes_every_seed_and_their_spread(tmp_path):
  summary = run(TINY.replace(num_seeds=3), tmp_path / "r")
  losses = [s["final"]["loss"] for s in summary["seeds"]]
  assert [s["seed"] for s in summary["seeds"]] == [0, 1, 2]
  assert len(set(losses)) == 3
  assert summary["final_loss_mean"] == pytest.approx(np.mean(losses))
  assert summary["final_loss_std"] == pytest.approx(np.std(losses, ddof=1))
  for seed in range(3):
    lines = (tmp_path / "r" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]


def poisoned_from(algorithm: FederatedAlgorithm, first_bad_round: int) -> FederatedAlgorithm:
  """``algorithm`` whose clients all get NaN inputs from round ``first_bad_round`` on."""

  def apply(state, data, key):
    bad = state.round >= first_bad_round
    data = data.replace(train_x=jnp.where(bad, jnp.nan, data.train_x))
    return algorithm.apply(state, data, key)

  return algorithm._replace(apply=apply)


def test_divergence_stops_the_run_and_names_the_last_good_checkpoint(tmp_path):
  experiment = prepare(TINY.replace(rounds=6))
  experiment = dataclasses.replace(experiment, algorithm=poisoned_from(experiment.algorithm, 3))
  run_dir = tmp_path / "r"
  run_dir.mkdir()
  with pytest.raises(DivergenceError) as caught:
    run_seeds(experiment, run_dir, 2)
  message = str(caught.value)
  assert "round 3, seed 0: every training client's update was non-finite" in message
  assert f"the last good checkpoint, of round 2, is kept in {run_dir / 'checkpoints'}" in message
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  records = [json.loads(line) for line in (run_dir / "seed0" / "metrics.jsonl").open()]
  assert [r["round"] for r in records] == [0, 1, 2, 3]
  assert records[3]["train_loss"] is None and records[2]["train_loss"] is not None
  assert json.loads((run_dir / "diverged.json").read_text())["message"] == message


def test_divergence_without_checkpoints_says_so(tmp_path):
  experiment = prepare(TINY)
  experiment = dataclasses.replace(experiment, algorithm=poisoned_from(experiment.algorithm, 1))
  (tmp_path / "r").mkdir()
  with pytest.raises(DivergenceError, match="no checkpoint was written"):
    run_seeds(experiment, tmp_path / "r", None)


def test_one_seed_has_no_spread():
  from fedvp_jax.summaries import mean_std, run_summary

  mean, std = mean_std([0.5])
  assert mean == 0.5 and np.isnan(std)  # undefined, not 0
  seed = lambda loss, degrees: {
    "final": {"loss": loss, "orthodromic_deg": degrees},
    "selected": {"round": 3, "loss": loss, "orthodromic_deg": degrees},
  }
  seeds = [seed(0.5, [1.0, 2.0])]
  summary = run_summary({}, {}, seeds)
  assert summary["final_loss_mean"] == 0.5 and summary["final_loss_std"] is None
  assert summary["orthodromic_deg_mean"] == [1.0, 2.0]
  assert summary["orthodromic_deg_std"] == [None, None]
  two = run_summary({}, {}, [*seeds, seed(0.7, [3.0, 4.0])])
  assert two["final_loss_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_chunks_of_rounds_equal_rounds_one_at_a_time():
  """The same rounds run in chunks of several rounds per call, or one per call, give the same
  state and every round's metrics (rows past a chunk's count stay zero)."""
  experiment = prepare(TINY.replace(eval_every=2))
  algorithm, data = experiment.algorithm, experiment.data
  one_at_a_time = [
    (jax.device_get(state), metrics)
    for state, metrics in rounds.iterate_rounds(algorithm, data, [0, 1], 5)
  ]
  chunks = list(rounds.iterate_chunks(algorithm, data, [0, 1], [1, 4, 5]))
  assert [(c.first, c.count) for c in chunks] == [(0, 1), (1, 3), (4, 1)]
  for chunk in chunks:
    for i in range(chunk.count):
      chex.assert_trees_all_close(
        chunk.round_metrics(i), one_at_a_time[chunk.first + i][1], rtol=1e-5, atol=1e-6
      )
    for i in range(chunk.count, 3):
      assert all(not np.any(leaf) for leaf in jax.tree.leaves(chunk.round_metrics(i)))
  chex.assert_trees_all_close(
    jax.device_get(chunks[-1].state), one_at_a_time[-1][0], rtol=1e-5, atol=1e-6
  )


def test_chunks_end_where_a_checkpoint_or_a_stop_needs_the_state():
  assert rounds.chunk_ends(0, 3) == [1, 3]  # one round first: its time is the compile's
  assert rounds.chunk_ends(0, 25, longest=10) == [1, 11, 21, 25]
  assert rounds.chunk_ends(7, 30, lambda done: done % 10 == 0) == [8, 10, 20, 30]
