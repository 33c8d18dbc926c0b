"""Models: shapes, the encoder/head split, pure functions, and the constant-velocity start."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedvp_jax.config import MODELS
from fedvp_jax.errors import ConfigError
from fedvp_jax.geometry import normalize
from fedvp_jax.models import build_model


def random_history(key, batch, m):
  steps = 0.05 * jax.random.normal(key, (batch, m, 3))
  start = normalize(jax.random.normal(jax.random.fold_in(key, 1), (batch, 1, 3)))
  return normalize(start + jnp.cumsum(steps, axis=1))


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_split(name):
  m, h, latent = 6, 3, 16
  model = build_model(name, m, h, latent_dim=latent)
  params = model.init(jax.random.key(0))
  assert set(params) == {"encoder", "head"}
  x = random_history(jax.random.key(1), 5, m)
  y = jax.jit(model.apply)(params, x)
  chex.assert_shape(y, (5, h, 3))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, atol=1e-5)
  z = jax.jit(model.encode)(params, x)
  chex.assert_shape(z, (5, latent))
  head = jax.jit(model.head)
  chex.assert_trees_all_close(head(params, z), y)
  # The head reads only the head subtree.
  no_encoder = {"encoder": jax.tree.map(jnp.zeros_like, params["encoder"]), "head": params["head"]}
  chex.assert_trees_all_close(head(no_encoder, z), y)


@pytest.mark.parametrize("name", MODELS)
def test_untrained_model_is_linear_extrapolation(name):
  model = build_model(name, 5, 4)
  params = model.init(jax.random.key(2))
  x = random_history(jax.random.key(3), 7, 5)
  step = x[:, -1] - x[:, -2]
  expected = normalize(x[:, -1, None] + jnp.arange(1, 5)[None, :, None] * step[:, None])
  chex.assert_trees_all_close(jax.jit(model.apply)(params, x), expected, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_init_is_seeded_and_gradients_are_finite(name):
  model = build_model(name, 4, 2)
  a, b = model.init(jax.random.key(5)), model.init(jax.random.key(5))
  chex.assert_trees_all_equal(a, b)
  c = model.init(jax.random.key(6))
  assert not all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  x = random_history(jax.random.key(7), 8, 4)
  loss = lambda p: jnp.mean(model.apply(p, x)[..., 0])
  grad = jax.jit(jax.grad(loss))
  grads = grad(a)
  chex.assert_tree_all_finite(grads)
  # The head's last layer starts at zero, so the encoder learns from the second step on.
  assert float(jnp.abs(grads["head"]["out"]["kernel"]).max()) > 0
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, a, grads)
  encoder_grads = grad(stepped)["encoder"]
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(encoder_grads))


def test_bad_model_settings():
  with pytest.raises(ConfigError, match=r"^model 'gru': choose one of lstm, transformer"):
    build_model("gru", 5, 1)
  with pytest.raises(ConfigError, match=r"^latent_dim 6: must exceed 6"):
    build_model("lstm", 5, 1, latent_dim=6)


def test_transformer_last_block_computes_the_last_position_alone():
  """The encoder's last block runs for the last position only; every block run in full and
  the last position read gives the same latent features and gradients."""
  from flax import nnx

  from fedvp_jax.models.transformer import TransformerEncoder

  encoder = TransformerEncoder(16, 6, rngs=nnx.Rngs(0))
  x = random_history(jax.random.key(8), 5, 6)

  def full(module, history):
    from fedvp_jax.models.head import motion_features

    h = module.embed(motion_features(history)) + module.position[...]
    for block in module.blocks:
      h = block(h)
    return module.out(module.norm(h[..., -1, :]))

  graph, state = nnx.split(encoder)
  fast = lambda s: nnx.merge(graph, s)(x)
  slow = lambda s: full(nnx.merge(graph, s), x)
  chex.assert_trees_all_close(jax.jit(fast)(state), jax.jit(slow)(state), atol=1e-6)
  grads = [jax.jit(jax.grad(lambda s, f=f: jnp.sum(f(s) ** 2)))(state) for f in (fast, slow)]
  chex.assert_trees_all_close(*grads, atol=1e-5)
