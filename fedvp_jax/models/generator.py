"""FedGen's conditional generator G(noise, label) -> latent z, as pure functions.

The label is a viewpoint y (a unit vector). G is conditioned either on y's coordinates or,
with ``embedding=True``, on a learned embedding of the heatmap cell that y falls in (FedGen's
``--embedding`` option). Normalisation is LayerNorm where FedGen uses BatchNorm: LayerNorm
has no running statistics, so the generator is a pure function of its params and the same in
training and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedvp_jax.config import require
from fedvp_jax.heatmap.grid import cell_index, check_grain
from fedvp_jax.models.functional import split_once
from fedvp_jax.types import Params


class LabelEncoding(nnx.Module):
  """A label's conditioning vector: its coordinates, or its heatmap cell's embedding."""

  def __init__(self, embedding: bool, grain: int, width: int, *, rngs: nnx.Rngs):
    self.grain = grain
    self.table = nnx.Embed(grain * grain // 2, width, rngs=rngs) if embedding else None
    self.width = width if embedding else 3

  def __call__(self, y: jax.Array) -> jax.Array:
    if self.table is None:
      return y
    row, col = cell_index(y, self.grain)
    return self.table(row * self.grain + col)


class SimpleGenerator(nnx.Module):
  """FedGen's shape: Dense -> normalisation -> ReLU -> Dense to z."""

  def __init__(
    self, label: LabelEncoding, noise_dim: int, hidden: int, latent_dim: int, *, rngs: nnx.Rngs
  ):
    self.label = label
    self.hidden = nnx.Linear(noise_dim + label.width, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, latent_dim, rngs=rngs)

  def __call__(self, noise: jax.Array, y: jax.Array) -> jax.Array:
    h = self.hidden(jnp.concatenate([noise, self.label(y)], axis=-1))
    return self.out(jax.nn.relu(self.norm(h)))


class ResidualBlock(nnx.Module):
  """Pre-norm residual MLP block: ``x + Dense(ReLU(Dense(LayerNorm(x))))``, width kept."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.inner = nnx.Linear(width, width, rngs=rngs)
    self.outer = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.outer(jax.nn.relu(self.inner(self.norm(x))))


class DeepGenerator(nnx.Module):
  """A residual MLP: Dense in, ``depth`` pre-norm residual blocks, norm, Dense to z.

  The label is also added back before the output layer, so inverting y -> z does not have to
  survive every block.
  """

  def __init__(
    self,
    label: LabelEncoding,
    noise_dim: int,
    hidden: int,
    latent_dim: int,
    depth: int = 3,
    *,
    rngs: nnx.Rngs,
  ):
    self.label = label
    self.inp = nnx.Linear(noise_dim + label.width, hidden, rngs=rngs)
    self.blocks = nnx.List([ResidualBlock(hidden, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden + label.width, latent_dim, rngs=rngs)

  def __call__(self, noise: jax.Array, y: jax.Array) -> jax.Array:
    label = self.label(y)
    h = self.inp(jnp.concatenate([noise, label], axis=-1))
    for block in self.blocks:
      h = block(h)
    return self.out(jnp.concatenate([self.norm(h), label], axis=-1))


class Generator(NamedTuple):
  """A generator as pure functions.

  Attributes:
    init: ``key -> Params``.
    apply: ``(params, noise: f32[n, noise_dim], y: f32[n, 3]) -> z: f32[n, latent_dim]``.
    noise_dim: size of the noise input.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array, jax.Array], jax.Array]
  noise_dim: int


def build_generator(
  kind: str,
  latent_dim: int,
  *,
  embedding: bool = False,
  grain: int = 256,
  noise_dim: int = 32,
  hidden: int = 256,
  embedding_dim: int = 32,
) -> Generator:
  """The ``"simple"`` or ``"deep"`` generator producing z of size ``latent_dim``.

  Args:
    kind: ``"simple"`` (FedGen's) or ``"deep"`` (residual MLP, 3 blocks).
    latent_dim: the model's latent size.
    embedding: condition on a learned embedding of y's heatmap cell instead of y.
    grain: the heatmap grid's grain (cells of the embedding: G * G / 2).
    noise_dim: size of the Gaussian noise input.
    hidden: hidden width.
    embedding_dim: width of the cell embedding.

  Raises:
    SettingError: for an unknown kind or grain.
  """
  require("generator", kind)
  check_grain(grain)
  classes = {"simple": SimpleGenerator, "deep": DeepGenerator}

  def make(rngs: nnx.Rngs) -> nnx.Module:
    label = LabelEncoding(embedding, grain, embedding_dim, rngs=rngs)
    return classes[kind](label, noise_dim, hidden, latent_dim, rngs=rngs)

  init, bind = split_once(make)
  apply = lambda params, noise, y: bind(params)(noise, y)
  return Generator(init, apply, noise_dim)
