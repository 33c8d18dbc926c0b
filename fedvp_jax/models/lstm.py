"""LSTM encoder: the researcher's first viewport model."""

import jax
import jax.numpy as jnp
from flax import nnx

from fedvp_jax.config import MOTION_DIM
from fedvp_jax.models.head import motion_features


class LSTMEncoder(nnx.Module):
  """One LSTM layer over the history's motion features, then Dense to the latent features.

  Maps ``f32[batch, M, 3]`` to ``f32[batch, latent_dim - 6]``.
  """

  def __init__(self, latent_dim: int, hidden: int = 64, *, rngs: nnx.Rngs):
    self.hidden = hidden
    self.cell = nnx.OptimizedLSTMCell(6, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, latent_dim - MOTION_DIM, rngs=rngs)

  def __call__(self, history: jax.Array) -> jax.Array:
    features = motion_features(history)
    zeros = jnp.zeros((*history.shape[:-2], self.hidden), history.dtype)
    carry = (zeros, zeros)
    # M is small and static: unrolling beats a scan here and keeps the module stateless.
    for t in range(history.shape[-2]):
      carry, out = self.cell(carry, features[..., t, :])
    return self.out(out)
