"""Configurations as data (issue 12): configurations that differ only in settings the state
holds as values run as one vmapped program (``over_configs``), and each equals itself run
alone."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest
from conftest import TINY_RUN, compiles

from fedvp_jax.algorithms import (
  clients_state,
  config_state,
  fedavg,
  over_configs,
  stack_configs,
)
from fedvp_jax.config import RunConfig, as_hyperparams, program_groups
from fedvp_jax.errors import SettingError
from fedvp_jax.experiment import prepare
from fedvp_jax.models import build_model
from fedvp_jax.rounds import run_rounds
from fedvp_jax.sweep import PRESETS, expand_spec

BASE = TINY_RUN.replace(eval_every=2, clients_per_round=2)


def assert_alone_equals_grouped(configs: list[RunConfig], seeds) -> None:
  """Each configuration, run alone for its rounds, ends where it ends inside the group (its
  state frozen after its last round), to float rounding."""
  varied, rounds = as_hyperparams(configs), [config.total_rounds for config in configs]
  # The group is built from a configuration that sends the full model, like the sweep does,
  # so that the server's model on new viewers exists for every member.
  leader = next(c for c in configs if c.round.send == "full")
  experiment = prepare(leader)
  group = over_configs(experiment.algorithm, varied, rounds)
  with compiles("run") as compiled:
    together = jax.device_get(run_rounds(group, experiment.data, seeds, max(rounds)))
  assert len(compiled) == 1, compiled
  # config_state and stack_configs are inverses.
  axis = not np.isscalar(seeds)
  runs = [config_state(together, c, seeds_axis=axis) for c in range(len(configs))]
  chex.assert_trees_all_equal(stack_configs(runs, seeds_axis=axis), together)
  for c, config in enumerate(configs):
    alone_experiment = prepare(config)
    chex.assert_trees_all_equal(alone_experiment.data, experiment.data)
    alone = jax.device_get(
      run_rounds(alone_experiment.algorithm, experiment.data, seeds, config.total_rounds)
    )
    mine = config_state(together, c, seeds_axis=not np.isscalar(seeds))
    # The round counter is the group's; everything else is this configuration's.
    chex.assert_trees_all_close(
      clients_state(mine).replace(round=clients_state(alone).round),
      clients_state(alone),
      rtol=2e-5,
      atol=2e-6,
      custom_message=f"configuration {c}: {config.algorithm}",
    )
    if hasattr(alone, "generator_params"):
      chex.assert_trees_all_close(
        (mine.generator_params, mine.hyper),
        (alone.generator_params, alone.hyper),
        rtol=2e-5,
        atol=2e-6,
      )


def test_the_fedavg_family_with_every_send_mode_and_beta_runs_as_one_program():
  configs = [
    BASE.replace(algorithm="fedavg"),
    BASE.replace(algorithm="fedavg", beta=0.5, learning_rate=0.03),
    BASE.replace(algorithm="local", learning_rate=0.02),
    BASE.replace(algorithm="partial-fedavg"),
    BASE.replace(algorithm="partial-fedavg", beta=0.5),
  ]
  assert_alone_equals_grouped(configs, seeds=(0, 1))


def test_the_fedgen_family_with_pretraining_and_warmup_runs_as_one_program():
  fedgen = BASE.replace(rounds=3, diversity_weight=0.1)
  configs = [
    fedgen.replace(algorithm="fedgen"),
    fedgen.replace(algorithm="fedgen", beta=0.5, pretrain_rounds=2, gen_warmup=2),
    fedgen.replace(algorithm="local-fedgen", alpha=0.5, gen_learning_rate=3e-3, alpha_decay=0.5),
    fedgen.replace(algorithm="fedgen", alpha_floor=0.6, alpha_decay=0.1),
    fedgen.replace(algorithm="partial-fedgen", pretrain_rounds=1, diversity_weight=0.0),
  ]
  assert_alone_equals_grouped(configs, seeds=0)


def test_only_settings_held_as_values_can_vary():
  experiment = prepare(BASE)
  with pytest.raises(SettingError, match=r"local_steps.*is static"):
    over_configs(experiment.algorithm, {"local_steps": [1, 2]})
  with pytest.raises(ValueError, match="one value per configuration"):
    over_configs(experiment.algorithm, {"beta": [0.5, 1.0]}, rounds=[3])
  # A group of one (nothing varies): the configuration alone, with a configurations axis.
  one = over_configs(experiment.algorithm, {}, rounds=[2])
  chex.assert_trees_all_close(
    config_state(jax.device_get(run_rounds(one, experiment.data, 0, 3)), 0),
    jax.device_get(run_rounds(experiment.algorithm, experiment.data, 0, 2)).replace(
      round=jax.numpy.asarray(3, jax.numpy.int32)
    ),
    rtol=1e-5,
    atol=1e-6,
  )
  # A learning rate the optimizer does not hold as a value cannot be varied.
  spec = experiment.spec
  model = build_model("lstm", spec.history, spec.horizon, latent_dim=BASE.latent_dim)
  plain = fedavg(model, optax.sgd(0.1), BASE.round)
  group = over_configs(plain, {"learning_rate": [0.1, 0.2]})
  with pytest.raises(SettingError, match="inject_hyperparams"):
    group.init(jax.random.key(0), experiment.data)


def test_the_weekly_table_is_two_programs():
  """The researcher's table (15 runs) splits into the FedAvg family and the FedGen family: all
  else they differ in (beta, send mode, pretraining length) are values."""
  runs = expand_spec(PRESETS["weekly-table"], "preset weekly-table")
  configs = [run.config for run in runs]
  groups = program_groups(configs)
  assert [[runs[i].name for i in group] for group in groups] == [
    [run.name for run in runs if not run.config.uses_generator],
    [run.name for run in runs if run.config.uses_generator],
  ]
  for group in groups:
    varied = as_hyperparams([configs[i] for i in group])
    assert set(varied) <= {"beta", "send", "pretrain_rounds"}
  with pytest.raises(SettingError, match=r"algorithm .*FedGen family.* is static"):
    as_hyperparams(configs)
  with pytest.raises(SettingError, match="local_steps 5: differs from 10: it is static"):
    as_hyperparams([configs[0], configs[0].replace(local_steps=5)])
