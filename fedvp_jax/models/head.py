"""The shared prediction head: the model's last two layers, and its input features.

Every viewport model is an encoder (history -> latent z) followed by this head (z ->
prediction). The head is what partial aggregation shares and what FedGen's generator feeds,
so it must turn a latent vector alone into viewpoints. The encoder therefore writes the
motion state into the first coordinates of z: the last observed position ``p`` (3) and the
last step's displacement ``v`` (3). The head predicts step k ahead as

    normalize(p + gain_k * k * v + offset_k(z)),   offset = Dense -> ReLU -> Dense,

a residual on linear extrapolation with a learned per-step gain. ``gain`` starts at 1 and the
last Dense at zero, so an untrained model is a constant-velocity predictor; training learns
the damping and corrections that real head motion needs.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fedvp_jax.geometry import normalize


def motion_features(history: jax.Array) -> jax.Array:
  """Positions and per-step displacements ``f32[..., M, 6]`` of ``history: f32[..., M, 3]``.

  Displacements make velocity explicit, which is most of what the next positions depend on;
  the first step's displacement is zero.
  """
  steps = jnp.diff(history, axis=-2, prepend=history[..., :1, :])
  return jnp.concatenate([history, steps], axis=-1)


class Head(nnx.Module):
  """Maps ``z: f32[..., latent_dim]`` to ``f32[..., H, 3]`` unit vectors (see module doc)."""

  def __init__(self, latent_dim: int, hidden: int, horizon: int, *, rngs: nnx.Rngs):
    self.horizon = horizon
    self.hidden = nnx.Linear(latent_dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, horizon * 3, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.gain = nnx.Param(jnp.ones((horizon,)))

  def __call__(self, z: jax.Array) -> jax.Array:
    offsets = self.out(jax.nn.relu(self.hidden(z)))
    offsets = offsets.reshape(*z.shape[:-1], self.horizon, 3)
    position, displacement = z[..., None, 0:3], z[..., None, 3:6]
    steps = jnp.arange(1, self.horizon + 1, dtype=z.dtype)[:, None]
    return normalize(position + self.gain[...][:, None] * steps * displacement + offsets)


class ViewportModel(nnx.Module):
  """An encoder and a :class:`Head`; ``encoder(x)`` gives ``latent_dim - 6`` features."""

  def __init__(self, encoder: nnx.Module, head: Head):
    self.encoder = encoder
    self.head = head

  def encode(self, history: jax.Array) -> jax.Array:
    """``f32[batch, M, 3] -> f32[batch, latent_dim]``: motion state, then learned features."""
    last = motion_features(history)[..., -1, :]
    return jnp.concatenate([last, self.encoder(history)], axis=-1)

  def __call__(self, history: jax.Array) -> jax.Array:
    return self.head(self.encode(history))
