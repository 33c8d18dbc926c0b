"""The jitted half of differential privacy: DP-FedAvg's clipped, noised aggregate and the
heatmaps FedGen's clients upload. Both run inside the round, vmapped over clients.

What the mechanisms are and what ε they cost is in :mod:`fedvp_jax.privacy`; the settings are
:class:`~fedvp_jax.config.PrivacyConfig`. Noise keys are folded off the round's key
(:data:`UPDATE_NOISE`, :data:`HEATMAP_NOISE`), so a DP round draws the same clients and
minibatches as the plain one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedvp_jax.algorithms.aggregation import where_clients
from fedvp_jax.algorithms.core import ClientsRound
from fedvp_jax.config import PrivacyConfig
from fedvp_jax.errors import SettingError
from fedvp_jax.heatmap import heatmaps
from fedvp_jax.types import Params, PRNGKey, StackedParams

UPDATE_NOISE = 0x5EED_0001
"""``fold_in`` tag of the round key that draws DP-FedAvg's noise."""

HEATMAP_NOISE = 0x5EED_0002
"""``fold_in`` tag of the round key that draws the dp-heatmaps' noise."""


def clip_by_norm(updates: StackedParams, clip_norm: float) -> tuple[StackedParams, jax.Array]:
  """Every client's update scaled down to L2 norm at most ``clip_norm`` (over all its leaves).

  Args:
    updates: leaves ``f32[K, ...]``, finite.
    clip_norm: C > 0.

  Returns:
    ``(clipped, norms)`` with ``norms: f32[K]`` the norms before clipping.
  """
  norms = jax.vmap(optax.tree.norm)(updates)
  # min(1, C / norm), written so that a zero update divides by nothing.
  scale = clip_norm / jnp.maximum(norms, clip_norm)
  return jax.vmap(optax.tree.scale)(scale, updates), norms


def private_mean(
  updates: StackedParams,
  used: jax.Array,
  clip_norm: float,
  noise_std: float | jax.Array,
  key: PRNGKey,
) -> tuple[Params, jax.Array]:
  """DP-FedAvg's aggregate: ``(sum_k clip(update_k) + N(0, noise_std^2 I)) / K``.

  The denominator is the number of selected clients K whether or not each was usable, so
  that no count depends on one client's data; an unusable client contributes a zero update.

  Args:
    updates: the selected clients' updates, leaves ``f32[K, ...]`` (may hold NaN where not
      ``used``).
    used: ``bool[K]`` clients whose update counts.
    clip_norm: C.
    noise_std: σ·C.
    key: draws the noise.

  Returns:
    ``(mean update, norms f32[K])``, the norms before clipping (0 for unused clients).
  """
  updates = where_clients(used, updates, optax.tree.zeros_like(updates))
  clipped, norms = clip_by_norm(updates, clip_norm)
  total = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), clipped)
  noise = optax.tree.random_like(key, total, jax.random.normal)
  noisy = optax.tree.add_scale(total, noise_std, noise)
  return optax.tree.scale(1.0 / used.shape[0], noisy), norms


def released(tree: Params, send: str) -> Params:
  """The part of a model DP-FedAvg aggregates: the head when only it reaches clients
  (``partial``) or only the generator reads it (localFedGen, ``none``); else all of it."""
  return tree if send == "full" else tree["head"]


def with_released(tree: Params, part: Params, send: str) -> Params:
  """``tree`` with its :func:`released` part replaced by ``part``."""
  return part if send == "full" else {**tree, "head": part}


def private_round(
  server: Params, outcome: ClientsRound, privacy: PrivacyConfig, send: str, key: PRNGKey
) -> ClientsRound:
  """A :func:`~fedvp_jax.algorithms.core.clients_round` outcome with DP-FedAvg's server model.

  The server applies the noised mean of the clients' clipped updates (trained minus started
  from) to the model it had before the round; the plain weighted mean of the outcome is
  dropped (and so never computed). ``metrics.extra`` gains ``dp_update_norm`` (the usable
  clients' mean norm before clipping) and ``dp_clipped`` (the fraction of them clipped).

  Args:
    server: the server's model before the round.
    outcome: the round's outcome.
    privacy: its ``noise_multiplier`` resolved (see :func:`fedvp_jax.privacy.account`).
    send: the round's send mode.
    key: the round's key.
  """
  sigma = noise_multiplier(privacy)
  result = outcome.result
  updates = optax.tree.sub(released(result.trained, send), released(result.started, send))
  mean, norms = private_mean(
    updates,
    outcome.used,
    privacy.clip_norm,
    sigma * privacy.clip_norm,
    jax.random.fold_in(key, UPDATE_NOISE),
  )
  server = with_released(server, optax.tree.add(released(server, send), mean), send)
  count = jnp.maximum(jnp.sum(outcome.used), 1)
  extra = {
    "dp_update_norm": jnp.sum(jnp.where(outcome.used, norms, 0.0)) / count,
    "dp_clipped": jnp.sum(outcome.used & (norms > privacy.clip_norm)) / count,
  }
  metrics = outcome.metrics._replace(extra={**outcome.metrics.extra, **extra})
  state = dataclasses.replace(outcome.state, server_params=server)
  return outcome._replace(state=state, metrics=metrics)


class HeatmapUpload(NamedTuple):
  """How clients upload labels (see :data:`fedvp_jax.config.LABEL_UPLOADS`).

  Attributes:
    mode: ``points``, ``heatmap`` or ``dp-heatmap``.
    grain: the heatmap grid's grain.
    sigma_deg: the heatmap blur.
    clip: B, the L2 bound of a dp-heatmap.
    noise_std: σ·B, the noise per cell of a dp-heatmap.
  """

  mode: str
  grain: int
  sigma_deg: float
  clip: float = 1.0
  noise_std: float = 0.0


def client_heatmap(points: jax.Array, upload: HeatmapUpload, key: PRNGKey) -> jax.Array:
  """What one client uploads under ``heatmap`` or ``dp-heatmap``: the heatmap of its
  ``points: f32[n, 3]`` in viewpoint counts, ``f32[G/2, G]``; under dp-heatmap clipped to L2
  norm ``upload.clip`` and noised (cells may be negative)."""
  heat = heatmaps(points[None], upload.grain, upload.sigma_deg, normalize=False)[0]
  if upload.mode == "heatmap":
    return heat
  norm = jnp.sqrt(jnp.sum(jnp.square(heat)))
  clipped = heat * (upload.clip / jnp.maximum(norm, upload.clip))
  return clipped + upload.noise_std * jax.random.normal(key, heat.shape)


def uploaded_heatmaps(points: jax.Array, upload: HeatmapUpload, key: PRNGKey) -> jax.Array:
  """The heatmaps the server gets, ``f32[K, G/2, G]``, from every client's training targets
  ``points: f32[K, n, 3]``.

  ``points``: the server builds them from the uploaded viewpoints; ``heatmap`` and
  ``dp-heatmap``: each client builds its own (:func:`client_heatmap`, vmapped over clients,
  client k noised with key ``split(key, K)[k]``). The server sets a dp-heatmap's negative
  cells to zero (post-processing, so free of privacy cost), and reads a client whose cells are
  all zero then as having no labels.
  """
  if upload.mode == "points":
    return heatmaps(points, upload.grain, upload.sigma_deg, normalize=False)
  keys = jax.random.split(key, points.shape[0])
  heat = jax.vmap(client_heatmap, in_axes=(0, None, 0))(points, upload, keys)
  return jnp.maximum(heat, 0.0) if upload.mode == "dp-heatmap" else heat


def heatmap_upload(privacy: PrivacyConfig | None, grain: int, sigma_deg: float) -> HeatmapUpload:
  """The :class:`HeatmapUpload` a run's settings describe."""
  if privacy is None:
    return HeatmapUpload("points", grain, sigma_deg)
  noise = 0.0
  if privacy.label_upload == "dp-heatmap":
    noise = noise_multiplier(privacy) * privacy.heatmap_clip
  return HeatmapUpload(privacy.label_upload, grain, sigma_deg, privacy.heatmap_clip, noise)


def noise_multiplier(privacy: PrivacyConfig) -> float:
  """σ of a resolved :class:`PrivacyConfig`.

  Raises:
    SettingError: when only ``target_epsilon`` is set: σ depends on the number of clients and
      rounds, so :func:`fedvp_jax.privacy.account` must choose it first (as ``prepare`` does).
  """
  if privacy.noise_multiplier is None:
    raise SettingError(
      "target_epsilon",
      privacy.target_epsilon,
      "choose the noise multiplier first (fedvp_jax.privacy.account; prepare does it)",
    )
  return privacy.noise_multiplier


__all__ = [
  "HEATMAP_NOISE",
  "UPDATE_NOISE",
  "HeatmapUpload",
  "client_heatmap",
  "clip_by_norm",
  "heatmap_upload",
  "noise_multiplier",
  "private_mean",
  "private_round",
  "released",
  "uploaded_heatmaps",
  "with_released",
]
