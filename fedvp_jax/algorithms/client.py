"""Local training: ``local_steps`` optimizer steps of one client inside ``lax.scan``,
vmapped over clients.

One local "epoch" is one minibatch step, as in FedGen's code. Each client's optimizer state
lives on the client across rounds (like a PyTorch optimizer created once per user) and is
never averaged; for plain SGD it is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedvp_jax.data.federated import client_keys
from fedvp_jax.geometry import turn_about_vertical
from fedvp_jax.metrics import training_loss
from fedvp_jax.models import Model
from fedvp_jax.types import Batch, OptState, Params, PRNGKey, StackedOptState, StackedParams

LossFn = Callable[[Params, Batch, PRNGKey, Any], jax.Array]
"""``(params, batch, key, context) -> scalar`` loss of one client's minibatch. ``context`` is
a round-constant pytree shared by every client (e.g. FedGen's generator), or ``None``."""


def prediction_loss(model: Model, loss: str) -> LossFn:
  """The plain training loss: ``loss`` (``"mse"`` or ``"orthodromic"``, the choices of
  ``RoundConfig.loss``) of the model's prediction on the batch.

  Raises:
    SettingError: for another name.
  """
  measure = training_loss(loss)

  def loss_fn(params: Params, batch: Batch, key: PRNGKey, context: Any) -> jax.Array:
    del key, context
    history, future = batch
    return measure(model.apply(params, history), future)

  return loss_fn


def augmented(loss_fn: LossFn, augment: str) -> LossFn:
  """``loss_fn`` on batches augmented as ``augment`` says (see
  :class:`~fedvp_jax.config.RoundConfig`): with ``"yaw"`` every window's history and future
  ``(f32[B, M, 3], f32[B, H, 3], ...)`` are turned about the vertical axis by one random angle
  per window; further batch elements (FedGen's labels) are left as they are."""
  if augment == "none":
    return loss_fn

  def loss(params: Params, batch: Batch, key: PRNGKey, context: Any) -> jax.Array:
    turn_key, key = jax.random.split(key)
    history, future, *rest = batch
    angle = jax.random.uniform(turn_key, history.shape[:-2], maxval=2 * jnp.pi)
    turned = (
      turn_about_vertical(history, angle[..., None]),
      turn_about_vertical(future, angle[..., None]),
    )
    return loss_fn(params, (*turned, *rest), key, context)

  return loss


LocalUpdate = Callable[
  [StackedParams, StackedOptState, Batch, PRNGKey, Any],
  tuple[StackedParams, StackedOptState, jax.Array],
]
"""Local training of K clients at once: ``(params, opt_state, batches, key, context) ->
(params, opt_state, losses)``, with leading axis K on ``params``, ``opt_state`` and
``batches = (f32[K, S, B, M, 3], f32[K, S, B, H, 3])``; ``losses: f32[K, S]`` is every step's
loss. ``key`` gives every client its own stream (one key is split; ``key[K]`` is every
client's own, see :func:`~fedvp_jax.data.federated.client_keys`); ``context`` is shared by
all."""


def local_update(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> LocalUpdate:
  """Builds the vmapped, scanned local update.

  Args:
    loss_fn: one client's loss on one minibatch.
    optimizer: the clients' optax optimizer; its state is per client and persists.

  Returns:
    A :data:`LocalUpdate` training K clients at once.
  """

  def one_client(
    params: Params, opt_state: OptState, batches: Batch, key: PRNGKey, context: Any
  ) -> tuple[Params, OptState, jax.Array]:
    def step(carry, inputs):
      params, opt_state = carry
      batch, step_key = inputs
      loss, grads = jax.value_and_grad(loss_fn)(params, batch, step_key, context)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    num_steps = batches[0].shape[0]
    (params, opt_state), losses = jax.lax.scan(
      step, (params, opt_state), (batches, jax.random.split(key, num_steps))
    )
    return params, opt_state, losses

  def apply(params, opt_state, batches, key, context):
    keys = client_keys(key, jax.tree.leaves(params)[0].shape[0])
    return jax.vmap(one_client, in_axes=(0, 0, 0, 0, None))(
      params, opt_state, batches, keys, context
    )

  return apply


def stack(tree: Any, num_clients: int) -> Any:
  """``num_clients`` copies of ``tree`` along a new leading clients axis."""
  return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_clients, *leaf.shape)), tree)
