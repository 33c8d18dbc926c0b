"""A trained model must beat no-motion and constant velocity at every horizon on real traces."""

import dataclasses

import numpy as np
import pytest

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import baseline_summaries, prepare
from fedvp_jax.rounds import train
from fedvp_jax.runner import drain
from fedvp_jax.summaries import beats_baselines, summary_dict


@pytest.mark.real_data
def test_fedavg_lstm_beats_both_baselines_at_every_horizon_on_david(david_root):
  config = RunConfig.of(
    algorithm="fedavg",
    dataset="David-m10-h5",
    data_dir=str(david_root),
    model="lstm",
    rounds=40,
    num_clients=10,
    eval_every=40,
  )
  experiment = prepare(config)
  (summary,) = drain(train(experiment, seeds=[0]))
  baselines = {k: summary_dict(v) for k, v in baseline_summaries(experiment.data, 5).items()}
  wins = beats_baselines(np.array(summary["final"]["orthodromic_deg"]), baselines)
  assert wins == {"no-motion": [True] * 5, "constant-velocity": [True] * 5}, (
    summary["final"],
    baselines,
  )


def test_beats_baselines_compares_every_step():
  baselines = {"a": {"orthodromic_deg": [1.0, 2.0]}, "b": {"orthodromic_deg": [0.5, 3.0]}}
  assert beats_baselines(np.array([0.9, 2.5]), baselines) == {
    "a": [True, False],
    "b": [False, True],
  }


def test_a_round_where_every_client_diverges_stops_the_run(tmp_path):
  config = RunConfig.of(
    algorithm="fedavg",
    dataset="Synthetic-m4-h2",
    model="lstm",
    rounds=3,
    num_clients=3,
    local_steps=1,
    batch_size=4,
    latent_dim=12,
  )
  experiment = prepare(config)
  poisoned = experiment.data.replace(train_x=experiment.data.train_x * float("nan"))
  # train() yields the diverged round's outcome, naming what happened, and then stops with no
  # summaries (the runner turns the outcome into a DivergenceError, see test_seeds).
  rounds = train(dataclasses.replace(experiment, data=poisoned), seeds=[0])
  outcomes = []
  with pytest.raises(StopIteration) as stopped:
    while True:
      outcomes.append(next(rounds))
  assert stopped.value.value == []
  assert [o.round for o in outcomes] == [0]
  assert outcomes[0].diverged is not None
  assert outcomes[0].diverged.startswith(
    "round 0, seed 0: every training client's update was non-finite"
  )
  records = [o.records[0] for o in outcomes]
  assert records[0]["train_loss"] is None and records[0]["excluded_clients"] == [0, 1, 2]
