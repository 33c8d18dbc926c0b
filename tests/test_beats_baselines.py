"""A trained model must beat no-motion and constant velocity at every horizon on real traces."""

import dataclasses

import numpy as np
import pytest

from fedvp_jax.training import (
  RunConfig,
  baseline_summaries,
  beats_baselines,
  prepare,
  summary_dict,
  train,
)


@pytest.mark.real_data
def test_fedavg_lstm_beats_both_baselines_at_every_horizon_on_david(david_root):
  config = RunConfig(
    algo="fedavg",
    dataset="David-m10-h5",
    data_dir=str(david_root),
    model="lstm",
    rounds=40,
    num_users=10,
    eval_every=40,
  )
  experiment = prepare(config)
  _, (summary,) = train(experiment, seeds=[0])
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
  from fedvp_jax.errors import DivergenceError

  config = RunConfig(
    algo="fedavg",
    dataset="Synthetic-m4-h2",
    model="lstm",
    rounds=3,
    num_users=3,
    local_epochs=1,
    batch_size=4,
    latent_dim=12,
  )
  experiment = prepare(config)
  poisoned = experiment.data.replace(train_x=experiment.data.train_x * float("nan"))
  records = []
  with pytest.raises(
    DivergenceError, match="round 0, seed 0: every training client's update was non-finite"
  ):
    train(
      dataclasses.replace(experiment, data=poisoned),
      seeds=[0],
      on_round=lambda seed, record: records.append(record),
    )
  assert records[0]["train_loss"] is None and records[0]["excluded_clients"] == [0, 1, 2]
