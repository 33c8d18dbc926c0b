"""Server aggregation and what clients take back from the server: pure tree arithmetic.

Send modes (what the server sends, and so what a client receives):

* ``full``: every layer;
* ``partial``: only the head (the model's last two layers); each client keeps its encoder;
* ``none``: nothing (purely local training).

A client receiving a layer takes ``beta * server + (1 - beta) * own``; ``beta = 1`` overwrites.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedvp_jax.types import Params, StackedParams


def weighted_mean(stacked: StackedParams, weights: jax.Array) -> Params:
  """The weighted mean of every client's params.

  Args:
    stacked: leaves ``f32[clients, ...]``.
    weights: ``f32[clients]`` non-negative, not all zero (e.g. training-sample counts).

  Returns:
    ``sum_k weights[k] * stacked[k] / sum_k weights[k]``, leaves ``f32[...]``.
  """
  normalized = weights / jnp.sum(weights)
  return jax.tree.map(lambda leaf: jnp.tensordot(normalized, leaf, axes=1), stacked)


def is_finite(stacked: StackedParams) -> jax.Array:
  """``bool[clients]``: True where every parameter of that client is finite."""
  per_leaf = [
    jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    for leaf in jax.tree.leaves(stacked)
  ]
  return jnp.all(jnp.stack(per_leaf), axis=0)


def aggregate(
  server: Params, stacked: StackedParams, weights: jax.Array
) -> tuple[Params, jax.Array]:
  """The server's new model: the weighted mean of the clients whose update is finite.

  Args:
    server: the current server model, kept when no client is usable.
    stacked: the participating clients' params, leaves ``f32[clients, ...]``.
    weights: ``f32[clients]`` aggregation weights (training-sample counts); padding clients
      carry weight 0.

  Returns:
    ``(new_server, used)`` with ``used: bool[clients]`` marking the clients averaged in.
  """
  used = is_finite(stacked) & (weights > 0)
  weights = jnp.where(used, weights, 0.0)
  # Non-finite clients carry weight 0, but 0 * NaN is NaN: zero their params before the mean.
  cleaned = where_clients(used, stacked, optax.tree.zeros_like(stacked))
  any_used = jnp.any(used)
  mean = weighted_mean(cleaned, jnp.where(any_used, weights, 1.0))  # finite even when unused
  new_server = optax.tree.where(any_used, mean, server)
  return new_server, used


def blend(server: Params, own: StackedParams, beta: float | jax.Array) -> StackedParams:
  """What every client keeps after receiving ``server``.

  Args:
    server: one model's params (or a subtree), leaves ``f32[...]``.
    own: every client's matching params, leaves ``f32[clients, ...]``.
    beta: the server's share, in (0, 1].

  Returns:
    ``beta * server + (1 - beta) * own``, leaves ``f32[clients, ...]``.
  """
  return jax.tree.map(lambda s, o: beta * s[None] + (1.0 - beta) * o, server, own)


def send_mask(params: Params, send: str) -> Params:
  """What the server sends as data: a tree like ``params`` with ``f32[]`` leaves, 1 where the
  server sends that layer and 0 where the client keeps its own (see the module doc), so that
  every send mode runs in one program (:func:`receive_sent`).

  Args:
    params: one model's params (or their shapes).
    send: ``"full"``, ``"partial"`` (the ``"head"`` subtree only) or ``"none"``.
  """

  def sent(path: Any, _: Any) -> jax.Array:
    head = getattr(path[0], "key", None) == "head"
    return jnp.asarray(send == "full" or (send == "partial" and head), jnp.float32)

  return jax.tree_util.tree_map_with_path(sent, params)


def receive_sent(
  server: Params, clients: StackedParams, sent: Params, beta: float | jax.Array
) -> StackedParams:
  """Every client's params after taking what the server sends.

  Args:
    server: the server's model.
    clients: every client's model, leaves ``f32[clients, ...]``.
    sent: :func:`send_mask`, ``f32[]`` leaves of 1 (sent) or 0.
    beta: the server's share of each received layer.

  Returns:
    ``w * server + (1 - w) * own`` per layer with ``w = beta * sent``, leaves ``f32[clients,
    ...]``: exactly the server's layer where ``w`` is 1 and exactly the client's where it is 0.
  """
  return jax.tree.map(lambda s, o, m: blend(s, o, beta * m), server, clients, sent)


def receive(
  server: Params, clients: StackedParams, send: str, beta: float | jax.Array
) -> StackedParams:
  """Every client's params after taking what the server sends, the send mode by name: the
  same as :func:`receive_sent` with its :func:`send_mask`, but ``server`` need only hold
  what is sent (the ``"head"`` subtree for ``"partial"``, nothing for ``"none"``), as when it
  crosses a network (:mod:`fedvp_jax.flower`).

  Args:
    server: the server's model (or the part of it that is sent).
    clients: every client's model, leaves ``f32[clients, ...]``.
    send: ``"full"``, ``"partial"`` (the ``"head"`` subtree only) or ``"none"``.
    beta: the server's share of each received layer.
  """
  if send == "none":
    return clients
  if send == "full":
    return blend(server, clients, beta)
  return {**clients, "head": blend(server["head"], clients["head"], beta)}


def where_clients(
  mask: jax.Array, if_true: StackedParams, if_false: StackedParams
) -> StackedParams:
  """Per client, ``if_true`` where ``mask: bool[clients]`` holds, else ``if_false``."""
  return jax.tree.map(
    lambda t, f: jnp.where(mask.reshape(mask.shape + (1,) * (t.ndim - 1)), t, f),
    if_true,
    if_false,
  )
