"""NNX modules turned into pure functions over plain parameter pytrees.

Everything outside ``models/`` sees a :class:`Model`: ``init(key) -> params`` and functions of
``(params, inputs)``. ``params`` is a nested dict with an ``"encoder"`` and a ``"head"``
subtree, so aggregation can treat the head (the model's last two layers) on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import jax
from flax import nnx

from fedvp_jax.config import require
from fedvp_jax.models.head import Head, ViewportModel
from fedvp_jax.models.lstm import LSTMEncoder
from fedvp_jax.models.transformer import TransformerEncoder
from fedvp_jax.types import Params

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


class Model(NamedTuple):
  """A viewport model as pure functions.

  Attributes:
    init: ``key -> Params``.
    apply: ``(params, history: f32[batch, M, 3]) -> f32[batch, H, 3]`` unit vectors.
    encode: ``(params, history: f32[batch, M, 3]) -> z: f32[batch, latent_dim]``.
    head: ``(params, z: f32[batch, latent_dim]) -> f32[batch, H, 3]``; reads only
      ``params["head"]``.
    latent_dim: the size of z.
    horizon: H.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  encode: Callable[[Params, jax.Array], jax.Array]
  head: Callable[[Params, jax.Array], jax.Array]
  latent_dim: int
  horizon: int


def split_once(
  make: Callable[[nnx.Rngs], ModuleT],
) -> tuple[Callable[[jax.Array], Params], Callable[[Params], ModuleT]]:
  """Splits the module that ``make(rngs)`` builds once, abstractly.

  Returns:
    ``(init, bind)``: ``init(key)`` builds the module's params as a plain nested dict;
    ``bind(params)`` rebuilds the module from them (inside a traced function this is free).
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))

  def init(key: jax.Array) -> Params:
    return nnx.to_pure_dict(nnx.state(make(nnx.Rngs(params=key))))

  def bind(params: Params) -> ModuleT:
    return nnx.merge(graphdef, params)

  return init, bind


def functional(make: Callable[[nnx.Rngs], ViewportModel], latent_dim: int, horizon: int) -> Model:
  """The pure functions of the :class:`ViewportModel` that ``make(rngs)`` builds."""
  init, bind = split_once(make)
  return Model(
    init=init,
    apply=lambda params, history: bind(params)(history),
    encode=lambda params, history: bind(params).encode(history),
    head=lambda params, z: bind(params).head(z),
    latent_dim=latent_dim,
    horizon=horizon,
  )


def build_model(
  name: str, history: int, horizon: int, *, latent_dim: int = 32, head_hidden: int = 64
) -> Model:
  """The named viewport model for windows of M = ``history`` and H = ``horizon`` samples.

  Args:
    name: ``"lstm"`` (one LSTM layer of 64 units) or ``"transformer"`` (2 pre-norm blocks,
      width 64, 4 heads, MLP 128).
    history: M.
    horizon: H.
    latent_dim: size of z, the encoder's output and the head's input (> 6: its first six
      coordinates are the motion state, see :mod:`fedvp_jax.models.head`).
    head_hidden: width of the head's hidden layer.

  Raises:
    SettingError: for an unknown name or a latent_dim of 6 or less.
  """
  require("model", name)
  require("latent_dim", latent_dim)
  encoders = {
    "lstm": lambda rngs: LSTMEncoder(latent_dim, rngs=rngs),
    "transformer": lambda rngs: TransformerEncoder(latent_dim, history, rngs=rngs),
  }

  def make(rngs: nnx.Rngs) -> ViewportModel:
    return ViewportModel(encoders[name](rngs), Head(latent_dim, head_hidden, horizon, rngs=rngs))

  return functional(make, latent_dim, horizon)
