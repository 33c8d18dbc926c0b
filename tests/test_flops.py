"""benchmarks/flops.py: loops count once per iteration, and three counts of local training agree."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

from fedvp_jax.algorithms import local_update, prediction_loss
from fedvp_jax.algorithms.client import stack
from fedvp_jax.models import build_model

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flops


def test_scan_of_matmuls_counts_every_iteration():
  def ten_products(x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=10)[0]

  x = jnp.ones((256, 256))
  compiled = jax.jit(ten_products).lower(x).compile()
  counted = flops.hlo_flops(compiled.as_text())
  assert counted.dot == 10 * 2 * 256**3
  # XLA's own count sees the body once: the reason this module exists.
  assert flops.xla_flops(compiled) < 0.2 * counted.dot


def test_loop_without_trip_count_is_refused():
  def until_small(x):
    return jax.lax.while_loop(lambda c: jnp.sum(c) > 1.0, lambda c: (c @ c) * 0.5, x)

  compiled = jax.jit(until_small).lower(jnp.ones((8, 8))).compile()
  with pytest.raises(ValueError, match="no known trip count"):
    flops.hlo_flops(compiled.as_text())


def test_conditional_counts_one_branch():
  def maybe_product(flag, x):
    return jax.lax.cond(flag, lambda: x @ x, lambda: x)

  compiled = jax.jit(maybe_product).lower(True, jnp.ones((64, 64))).compile()
  assert flops.hlo_flops(compiled.as_text(), "max").dot == 2 * 64**3
  assert flops.hlo_flops(compiled.as_text(), "min").dot == 0


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_three_counts_of_local_training_agree(model):
  clients, steps, batch, history = 2, 3, 8, 5
  net = build_model(model, history, 1)
  optimizer = optax.sgd(0.01)
  params = stack(net.init(jax.random.key(0)), clients)
  opt_state = jax.vmap(optimizer.init)(params)
  update = jax.jit(local_update(prediction_loss(net, "mse"), optimizer))

  def compiled_for(num_steps):
    x = jax.random.normal(jax.random.key(1), (clients, num_steps, batch, history, 3))
    y = jax.random.normal(jax.random.key(2), (clients, num_steps, batch, 1, 3))
    return update.lower(params, opt_state, (x, y), jax.random.key(3), None).compile()

  scanned, single = compiled_for(steps), compiled_for(1)
  assert " while(" in scanned.as_text() and " while(" not in single.as_text()
  analytic = flops.analytic_step_flops(model, net.init(jax.random.key(0)), batch, history)
  counted = flops.hlo_flops(scanned.as_text())
  assert counted.dot == analytic * steps * clients
  # The loop-free step is counted right by XLA itself; the loop adds only its counter.
  assert counted.total == pytest.approx(flops.xla_flops(single) * steps, rel=1e-3)
