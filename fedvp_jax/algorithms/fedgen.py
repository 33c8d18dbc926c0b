"""FedGen (Zhu et al., ICML 2021) adapted to viewport regression, as one compiled round.

FedGen's server trains a generator G(noise, label) -> latent z such that the clients' heads
map z back to the label; clients use G's samples as data-free knowledge of what the other
clients learned. Here the label is a viewpoint y on the sphere, and one round is:

1. every client receives the server's model (all, the head, or nothing) with ``beta``; the
   deployed models are evaluated;
2. the selected clients train ``local_steps`` steps on
   ``L(real) + alpha_t * MSE(head(G(eps, y_hat))[H], y_hat)`` (``L`` the training loss,
   ``RoundConfig.loss``; the generator terms are FedGen's MSE) over ``gen_batch_size`` labels
   y_hat drawn from their own final targets (FedGen's clients sample labels they have), plus,
   with ``latent_weight > 0``, FedGen's second term
   ``beta_t * MSE(model(x)[H], stopgrad(head(G(eps, y[H]))[H]))``. G's params are constants;
3. they upload the final targets of the minibatches they trained on; the server turns each
   client's into a heatmap (Gaussian blur on an equirectangular grid);
4. the server takes ``gen_steps`` Adam steps on G: labels y from the clients' combined
   heatmap, client k's head weighted by ``w_k(y) = heat_k(y) / sum_j heat_j(y)``, minimising
   the teacher loss ``sum_k mean_i w_k(y_i) ||head_k(G(eps_i, y_i))[H] - y_i||^2`` plus
   ``diversity_weight`` times FedGen's diversity loss;
5. the server averages the clients' models (weighted by sample counts).

For H > 1 the label is the final target position (index H) and heads are read at that step.

The heads here (:mod:`fedvp_jax.models.head`) read the last position and displacement from
the first six coordinates of z, so a generator can satisfy the teacher loss largely by
writing y into those coordinates. That makes the y -> z inversion easy to learn (the
researcher suspected FedGen's simple generator could not learn it), but it also limits how
much the generator has to learn about the clients' heads beyond that.

Schedules, as in FedGen's code: ``alpha_t = max(alpha_floor, alpha * alpha_decay^t)`` (FedGen's
floor 1e-4 and decay 0.98 by default) and likewise ``beta_t``, with t counting rounds since
the generator was switched on; G's learning rate decays by 0.98 per round. The generator is
off in the first round (it is untrained) and, with ``pretrain_rounds = P``, during the first
P rounds, while the server already trains it from the clients' heads (two-stage training);
``gen_warmup = R`` then ramps alpha_t and beta_t linearly from 0 over R rounds. P rounds are
in addition to the run's ``--rounds``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedvp_jax.algorithms import dp
from fedvp_jax.algorithms.aggregation import where_clients
from fedvp_jax.algorithms.client import LocalUpdate, LossFn, augmented, local_update, stack
from fedvp_jax.algorithms.core import (
  ClientsState,
  FederatedAlgorithm,
  Part,
  RoundMetrics,
  clients_round,
  evaluate_deployed,
  evaluate_server,
  init_clients,
)
from fedvp_jax.config import FedGenConfig, PrivacyConfig, RoundConfig
from fedvp_jax.data.federated import ClientData, EvalWindows
from fedvp_jax.heatmap import combined, label_weights, sample_labels
from fedvp_jax.metrics import ErrorSums, mse, training_loss
from fedvp_jax.models import Model
from fedvp_jax.models.generator import Generator, build_generator
from fedvp_jax.types import OptState, Params, PRNGKey, StackedParams

SCHEDULE_DECAY = 0.98
"""Per-round decay of the generator's learning rate (FedGen's). alpha_t and beta_t decay by the
``alpha_decay`` setting (FedGen's: the same 0.98) to its ``alpha_floor``."""


@struct.dataclass
class GeneratorHyperparams:
  """FedGen's settings that are values, not program structure (see
  :class:`~fedvp_jax.algorithms.core.RoundHyperparams`).

  Attributes:
    alpha: ``f32[]`` initial weight of the clients' generator term.
    latent_weight: ``f32[]`` initial weight of the latent term (whether the term is in the
      program at all is structure: ``FedGenConfig.latent_weight > 0``).
    diversity_weight: ``f32[]`` weight of the diversity loss in G's objective.
    pretrain_rounds: ``i32[]`` stage-one rounds.
    warmup: ``i32[]`` rounds over which alpha_t ramps up after stage one.
    alpha_decay: ``f32[]`` per-round decay of alpha_t and beta_t.
    alpha_floor: ``f32[]`` the least alpha_t and beta_t decay to.
  """

  alpha: jax.Array
  latent_weight: jax.Array
  diversity_weight: jax.Array
  pretrain_rounds: jax.Array
  warmup: jax.Array
  alpha_decay: jax.Array
  alpha_floor: jax.Array


def generator_hyperparams(cfg: FedGenConfig) -> GeneratorHyperparams:
  """``cfg``'s :class:`GeneratorHyperparams`."""
  f32 = lambda value: jnp.asarray(value, jnp.float32)
  return GeneratorHyperparams(
    alpha=f32(cfg.alpha),
    latent_weight=f32(cfg.latent_weight),
    diversity_weight=f32(cfg.diversity_weight),
    pretrain_rounds=jnp.asarray(cfg.pretrain_rounds, jnp.int32),
    warmup=jnp.asarray(cfg.gen_warmup, jnp.int32),
    alpha_decay=f32(cfg.alpha_decay),
    alpha_floor=f32(cfg.alpha_floor),
  )


@struct.dataclass
class FedGenState:
  """The FedGen family's state.

  Attributes:
    clients: server and client models, optimizer states, round count, round settings.
    generator_params: ``Params`` of G.
    generator_opt_state: G's Adam state (its step count drives the learning-rate decay).
    hyper: FedGen's settings held as values (:class:`GeneratorHyperparams`).
  """

  clients: ClientsState
  generator_params: Params
  generator_opt_state: OptState
  hyper: GeneratorHyperparams

  def with_hyperparam(self, name: str, value: Any) -> FedGenState:
    """This state with setting ``name`` (FedGen's ``alpha``, ``latent_weight``,
    ``diversity_weight``, ``pretrain_rounds``, ``gen_warmup``, ``alpha_decay``,
    ``alpha_floor``, ``gen_learning_rate``, or one of :meth:`ClientsState.with_hyperparam`'s)
    set to ``value``."""
    field = {"gen_warmup": "warmup"}.get(name, name)
    if field in {f.name for f in dataclasses.fields(GeneratorHyperparams)}:
      old = getattr(self.hyper, field)
      return dataclasses.replace(
        self, hyper=dataclasses.replace(self.hyper, **{field: jnp.asarray(value, old.dtype)})
      )
    if name == "gen_learning_rate":
      opt = self.generator_opt_state
      rate = jnp.asarray(value, opt.hyperparams["learning_rate"].dtype)
      hyperparams = {**opt.hyperparams, "learning_rate": rate}
      return dataclasses.replace(self, generator_opt_state=opt._replace(hyperparams=hyperparams))
    return dataclasses.replace(self, clients=self.clients.with_hyperparam(name, value))


class GeneratorContext(NamedTuple):
  """What every client's loss gets from the server in a round.

  Attributes:
    params: G's params (constants in the client step).
    alpha: ``f32[]`` weight of the generated-label term; 0 switches G off.
    latent_weight: ``f32[]`` weight of the latent term.
  """

  params: Params
  alpha: jax.Array
  latent_weight: jax.Array


def generator_weights(
  config: FedGenConfig | GeneratorHyperparams, round_index: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(alpha_t, beta_t)`` of a round (0 while the generator is off); see the module doc."""
  hyper = generator_hyperparams(config) if isinstance(config, FedGenConfig) else config
  start = jnp.maximum(hyper.pretrain_rounds, 1)
  t = (round_index - start).astype(jnp.float32)
  decay = hyper.alpha_decay**t
  ramp = jnp.where(
    hyper.warmup > 0, jnp.clip((t + 1) / jnp.maximum(hyper.warmup, 1), 0.0, 1.0), 1.0
  )
  on = round_index >= start

  def weight(initial: jax.Array) -> jax.Array:
    # A weight of 0 is off: the floor would otherwise switch it on.
    scheduled = jnp.maximum(hyper.alpha_floor, initial * decay) * ramp
    return jnp.where(on & (initial > 0), scheduled, 0.0)

  return weight(hyper.alpha), weight(hyper.latent_weight)


def diversity_loss(noise: jax.Array, z: jax.Array) -> jax.Array:
  """FedGen's diversity loss: ``exp(-mean_ij ||eps_i - eps_j||^2_mean * |z_i - z_j|_mean)``.

  Args:
    noise: ``f32[n, noise_dim]``.
    z: ``f32[n, latent_dim]``.
  """
  z_dist = jnp.mean(jnp.abs(z[:, None] - z[None]), axis=-1)
  noise_dist = jnp.mean(jnp.square(noise[:, None] - noise[None]), axis=-1)
  return jnp.exp(jnp.mean(-noise_dist * z_dist))


def fedgen_client_loss(model: Model, generator: Generator, latent_term: bool, loss: str) -> LossFn:
  """A client's loss: ``loss`` (``RoundConfig.loss``) on its batch plus the generator terms,
  which stay MSE as in FedGen (see the module doc).

  The batch is ``(history f32[B, M, 3], future f32[B, H, 3], labels f32[B_gen, 3])``; the
  context is a :class:`GeneratorContext`. When both weights are 0 the generator terms are not
  computed at all, so the loss is exactly the plain one; ``latent_term=False`` leaves the
  latent term out of the program.
  """

  measure = training_loss(loss)

  def loss_fn(params: Params, batch: Any, key: PRNGKey, context: GeneratorContext) -> jax.Array:
    history, future, labels = batch
    prediction = model.apply(params, history)
    g_params = jax.lax.stop_gradient(context.params)

    def generator_terms() -> jax.Array:
      label_key, latent_key = jax.random.split(key)
      noise = jax.random.normal(label_key, (labels.shape[0], generator.noise_dim))
      z = generator.apply(g_params, noise, labels)
      teacher = context.alpha * mse(model.head(params, z)[:, -1], labels)
      if not latent_term:
        return teacher
      noise = jax.random.normal(latent_key, (history.shape[0], generator.noise_dim))
      target = model.head(params, generator.apply(g_params, noise, future[:, -1]))
      latent = mse(prediction[:, -1], jax.lax.stop_gradient(target[:, -1]))
      return teacher + context.latent_weight * latent

    active = (context.alpha > 0) | (context.latent_weight > 0)
    extra = jax.lax.cond(active, generator_terms, lambda: jnp.zeros((), prediction.dtype))
    return measure(prediction, future) + extra

  return loss_fn


def teacher_loss(
  model: Model,
  generator: Generator,
  g_params: Params,
  heads: StackedParams,
  usable: jax.Array,
  labels: jax.Array,
  weights: jax.Array,
  noise: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """FedGen's teacher loss of G against the clients' heads, and the z it generated.

  Args:
    model: gives ``head``.
    generator: G.
    g_params: G's params.
    heads: the clients' params, leaves ``f32[K, ...]`` (only the heads are read).
    usable: ``bool[K]``; clients with non-finite params contribute nothing.
    labels: ``f32[n, 3]`` sampled viewpoints.
    weights: ``f32[K, n]`` each client's weight per label (columns sum to 1).
    noise: ``f32[n, noise_dim]``.

  Returns:
    ``(sum_k mean_i w_k(y_i) ||head_k(z_i)[H] - y_i||^2, z)``.
  """
  z = generator.apply(g_params, noise, labels)
  final = jax.vmap(lambda p: model.head(p, z)[:, -1])(heads)  # [K, n, 3]
  error = jnp.sum(jnp.square(final - labels[None]), axis=-1)
  error = jnp.where(usable[:, None], error, 0.0)
  return jnp.sum(jnp.mean(weights * error, axis=1)), z


GeneratorUpdate = Callable[..., tuple[Params, OptState, jax.Array, jax.Array]]
"""``(g_params, g_opt_state, heads, usable, heat, key, diversity_weight=None) -> (g_params,
g_opt_state, teacher, diversity)``: the server's generator steps of one round. ``heads``: the
trained clients' params, leaves ``f32[K, ...]``; ``usable: bool[K]``; ``heat: f32[K, G/2, G]``
their label heatmaps; ``diversity_weight``: ``f32[]``, or ``None`` for the one it was built
with; ``teacher`` and ``diversity`` are the losses' means over the steps."""


def generator_optimizer(learning_rate: float, steps_per_round: int) -> optax.GradientTransformation:
  """G's Adam, its learning rate decaying by :data:`SCHEDULE_DECAY` per round of
  ``steps_per_round`` steps. The initial rate is an ``optax.inject_hyperparams`` value in the
  optimizer state (``hyperparams["learning_rate"]``), so it can change without a recompile."""

  def adam(learning_rate: jax.Array) -> optax.GradientTransformation:
    schedule = optax.exponential_decay(
      learning_rate, steps_per_round, decay_rate=SCHEDULE_DECAY, staircase=True
    )
    return optax.adam(schedule)

  return optax.inject_hyperparams(adam, hyperparam_dtype=jnp.float32)(learning_rate=learning_rate)


def generator_update(
  model: Model,
  generator: Generator,
  g_optimizer: optax.GradientTransformation,
  num_steps: int,
  batch_size: int,
  diversity_weight: float,
) -> GeneratorUpdate:
  """Builds the server's generator training: ``num_steps`` optimizer steps inside
  ``lax.scan``, each on ``batch_size`` labels drawn from the clients' combined heatmap."""

  def train(g_params, g_opt, heads, usable, heat, key, diversity_weight=diversity_weight):
    # An unusable client's head may hold NaN, and 0 * NaN is NaN in the gradient even where its
    # error is masked: give those clients harmless zero params and no heat at all.
    heads = where_clients(usable, heads, optax.tree.zeros_like(heads))
    heat = jnp.where(usable[:, None, None], heat, 0.0)
    pool = combined(heat)

    def step(carry, key):
      g_params, g_opt = carry
      label_key, noise_key = jax.random.split(key)
      labels = sample_labels(label_key, pool, batch_size)
      weights = label_weights(heat, labels)
      noise = jax.random.normal(noise_key, (batch_size, generator.noise_dim))

      def objective(g_params):
        teacher, z = teacher_loss(model, generator, g_params, heads, usable, labels, weights, noise)
        diversity = diversity_loss(noise, z)
        return teacher + diversity_weight * diversity, (teacher, diversity)

      grads, (teacher, diversity) = jax.grad(objective, has_aux=True)(g_params)
      updates, new_opt = g_optimizer.update(grads, g_opt, g_params)
      new_params = optax.apply_updates(g_params, updates)
      # A non-finite step (or no usable client) must never reach the generator: every client
      # would train on it next round.
      ok = jnp.any(usable) & _all_finite(new_params)
      carry = optax.tree.where(ok, (new_params, new_opt), (g_params, g_opt))
      return carry, (teacher, diversity)

    (g_params, g_opt), (teacher, diversity) = jax.lax.scan(
      step, (g_params, g_opt), jax.random.split(key, num_steps)
    )
    return g_params, g_opt, jnp.mean(teacher), jnp.mean(diversity)

  return train


def _all_finite(tree: Any) -> jax.Array:
  """``bool[]``: True when every leaf of ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


class FedGenParts(NamedTuple):
  """The pieces of a FedGen round that the vmapped round and a deployed one
  (:mod:`fedvp_jax.flower`) share.

  Attributes:
    generator: G.
    g_optimizer: G's Adam, its learning rate decaying per round.
    update: the clients' local update (:func:`fedgen_client_loss`, augmented).
    train_generator: the server's generator steps (:func:`generator_update`).
    upload: how clients upload their labels.
  """

  generator: Generator
  g_optimizer: optax.GradientTransformation
  update: LocalUpdate
  train_generator: GeneratorUpdate
  upload: dp.HeatmapUpload


def fedgen_parts(
  model: Model,
  optimizer: optax.GradientTransformation,
  config: RoundConfig,
  cfg: FedGenConfig,
  privacy: PrivacyConfig | None = None,
) -> FedGenParts:
  """Builds :class:`FedGenParts` from the run's settings (arguments as :func:`fedgen`)."""
  generator = build_generator(
    cfg.generator,
    model.latent_dim,
    embedding=cfg.embedding,
    grain=cfg.grain,
    noise_dim=cfg.noise_dim,
    hidden=cfg.generator_hidden,
  )
  g_optimizer = generator_optimizer(cfg.gen_learning_rate, cfg.gen_steps)
  client_loss = fedgen_client_loss(model, generator, cfg.latent_weight > 0, config.loss)
  train_generator = generator_update(
    model,
    generator,
    g_optimizer,
    cfg.gen_steps,
    cfg.server_batch_size or config.batch_size,
    cfg.diversity_weight,
  )
  return FedGenParts(
    generator,
    g_optimizer,
    local_update(augmented(client_loss, config.augment), optimizer),
    train_generator,
    dp.heatmap_upload(privacy, cfg.grain, cfg.heatmap_sigma),
  )


def uploaded_points(batches: tuple[jax.Array, ...]) -> jax.Array:
  """``f32[K, S * B, 3]``: the final targets of the minibatches K clients trained on
  (``batches[1]: f32[K, S, B, H, 3]``), which they upload as labels."""
  targets = batches[1][..., -1, :]
  return targets.reshape(targets.shape[0], -1, 3)


def fedgen(
  model: Model,
  optimizer: optax.GradientTransformation,
  config: RoundConfig,
  fedgen_config: FedGenConfig | None = None,
  privacy: PrivacyConfig | None = None,
) -> FederatedAlgorithm:
  """The FedGen family: ``config.send`` is ``full`` (FedGen), ``none`` (localFedGen: only the
  generator is shared) or ``partial`` (partialFedGen: the head is aggregated and sent).

  ``privacy`` (its noise multiplier resolved) says how clients upload labels and, with DP on,
  makes the server model DP-FedAvg's. The generator then trains against the DP server
  model's head alone, on the pooled dp-heatmaps: the clients' own heads would reach the server
  unnoised.

  The state is a :class:`FedGenState`; round metrics carry ``extra`` scalars
  ``generator_weight``, ``teacher_loss`` and ``diversity_loss``.
  """
  cfg = fedgen_config or FedGenConfig()
  private = privacy if privacy is not None and privacy.enabled else None
  parts = fedgen_parts(model, optimizer, config, cfg, privacy)
  generator, g_optimizer, update = parts.generator, parts.g_optimizer, parts.update
  upload, train_generator = parts.upload, parts.train_generator

  def init(key: PRNGKey, data: ClientData) -> FedGenState:
    config.check_clients(data.num_clients)
    model_key, g_key = jax.random.split(key)
    g_params = generator.init(g_key)
    return FedGenState(
      init_clients(model, optimizer, config, model_key, data.num_rows),
      g_params,
      g_optimizer.init(g_params),
      generator_hyperparams(cfg),
    )

  def apply(state: FedGenState, data: ClientData, key: PRNGKey) -> tuple[FedGenState, RoundMetrics]:
    clients_key, server_key = jax.random.split(key)
    alpha, latent_weight = generator_weights(state.hyper, state.clients.round)
    context = GeneratorContext(state.generator_params, alpha, latent_weight)
    outcome = clients_round(
      model, config, update, state.clients, data, clients_key, context, cfg.gen_batch_size
    )
    # Clients upload the final targets of what they trained on (as points or heatmaps);
    # counts, not normalised, so a client's weight at a label grows with how often it saw it.
    points = uploaded_points(outcome.result.batches)
    heat = dp.uploaded_heatmaps(points, upload, jax.random.fold_in(key, dp.HEATMAP_NOISE))
    heads, usable = outcome.result.trained, outcome.used
    if private is not None:
      outcome = dp.private_round(state.clients.server_params, outcome, private, config.send, key)
      heads = stack(outcome.state.server_params, 1)
      usable = jnp.ones((1,), bool)
      heat = jnp.sum(heat, axis=0, keepdims=True)
    g_params, g_opt, teacher, diversity = train_generator(
      state.generator_params,
      state.generator_opt_state,
      heads,
      usable,
      heat,
      server_key,
      state.hyper.diversity_weight,
    )
    extra = {"generator_weight": alpha, "teacher_loss": teacher, "diversity_loss": diversity}
    metrics = outcome.metrics._replace(extra={**outcome.metrics.extra, **extra})
    return dataclasses.replace(
      state, clients=outcome.state, generator_params=g_params, generator_opt_state=g_opt
    ), metrics

  def evaluate(
    state: FedGenState, data: ClientData, part: Part = "test", best: bool = False
  ) -> ErrorSums:
    return evaluate_deployed(model, state.clients, data, part, best)

  def evaluate_global(state: FedGenState, windows: EvalWindows, best: bool = False) -> ErrorSums:
    return evaluate_server(model, state.clients, windows, best)

  return FederatedAlgorithm(
    init, apply, evaluate, evaluate_global if config.send == "full" else None
  )
