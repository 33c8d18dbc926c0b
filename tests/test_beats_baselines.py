"""A trained model must beat the best trivial predictor at every horizon on real traces."""

import dataclasses

import numpy as np
import pytest
from conftest import TINY_RUN

from fedvp_jax.baselines import best_trivial
from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import baseline_summaries, prepare
from fedvp_jax.rounds import train
from fedvp_jax.runner import drain
from fedvp_jax.summaries import beats_baselines, gains_percent, summary_dict


@pytest.mark.real_data
def test_fedavg_with_the_defaults_beats_the_best_trivial_predictor_on_david(david_root):
  """FedAvg with the library's defaults learns something the trivial predictors do not know:
  its selected model beats the best of them at all five steps by more than the seeds differ."""
  config = RunConfig.of(
    algorithm="fedavg",
    dataset="David-m10-h5",
    data_dir=str(david_root),
    rounds=20,
    eval_every=10,
  )
  assert_beats_the_best_trivial_predictor_beyond_the_seeds_spread(config)


def assert_beats_the_best_trivial_predictor_beyond_the_seeds_spread(config: RunConfig) -> None:
  experiment = prepare(config)
  summaries = drain(train(experiment, seeds=[0, 1]))
  horizon = experiment.spec.horizon
  baselines = {
    k: summary_dict(v) for k, v in baseline_summaries(experiment.data.test, horizon).items()
  }
  best = best_trivial({k: v["orthodromic_deg"] for k, v in baselines.items()})
  degrees = np.array([s["selected"]["orthodromic_deg"] for s in summaries])  # [seeds, H]
  margin = np.array(best) - degrees.mean(axis=0)
  spread = degrees.std(axis=0, ddof=1)
  assert (margin > spread).all() and (margin > 0).all(), (margin, spread, best)


@pytest.mark.real_data
@pytest.mark.parametrize("split", ["video", "time"])
def test_the_defaults_hold_on_a_dataset_derived_from_david(david_root, tmp_path, split):
  """Users will point the tool at datasets it has not seen: other viewers, other videos, no
  split files. A dataset built from half of David's videos and half of its users, without
  split files (so a seeded video split, or the time split), must be learned by the defaults
  as David is."""
  source = david_root / "David_MMSys_18" / "sampled_dataset"
  videos = sorted(p.name for p in source.iterdir())[1::2]
  for video in videos:
    users = sorted((source / video).iterdir(), key=lambda p: p.name)[::2]
    (tmp_path / "HalfDavid" / "sampled_dataset" / video).mkdir(parents=True)
    for user in users:
      (tmp_path / "HalfDavid" / "sampled_dataset" / video / user.name).symlink_to(user)
  config = RunConfig.of(
    algorithm="fedavg",
    dataset="HalfDavid-m10-h5",
    data_dir=str(tmp_path),
    split=split,
    num_clients=10,
    rounds=20,
    eval_every=10,
  )
  assert_beats_the_best_trivial_predictor_beyond_the_seeds_spread(config)


def test_beats_baselines_compares_every_step():
  baselines = {"a": {"orthodromic_deg": [1.0, 2.0]}, "b": {"orthodromic_deg": [0.5, 3.0]}}
  assert beats_baselines(np.array([0.9, 2.5]), baselines) == {
    "a": [True, False],
    "b": [False, True],
    "best": [False, False],
  }
  assert beats_baselines(np.array([0.4, 1.0]), baselines)["best"] == [True, True]


def test_gains_are_over_the_best_trivial_predictor_at_each_step():
  baselines = {"a": {"orthodromic_deg": [2.0, 4.0]}, "b": {"orthodromic_deg": [1.0, 5.0]}}
  assert gains_percent([0.9, 5.0], baselines) == pytest.approx([10.0, -25.0])


def test_a_round_where_every_client_diverges_stops_the_run(tmp_path):
  config = TINY_RUN.replace(algorithm="fedavg", local_steps=1, batch_size=4)
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
