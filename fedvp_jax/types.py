"""Names for the pytree roles that flow through fedvp_jax.

Shapes use the notation ``f32[clients, ...]``; ``...`` stands for one model's parameter shapes.
The clients axis is always axis 0 and is the axis that gets sharded over devices.
"""

from typing import Any

import jax

PRNGKey = jax.Array
"""A typed PRNG key (``jax.random.key``). Randomness only ever comes from these."""

Params = Any
"""One model's parameters: ``{"encoder": {...}, "head": {...}}`` of ``f32`` arrays."""

StackedParams = Any
"""Parameters of every client: a :data:`Params` tree whose leaves are ``f32[clients, ...]``."""

OptState = Any
"""One client's optax optimizer state."""

StackedOptState = Any
"""Every client's optimizer state, leaves ``[clients, ...]``."""

State = Any
"""An algorithm's state: a ``flax.struct`` dataclass whose docstring gives every field's
shape (:class:`~fedvp_jax.algorithms.ClientsState`, :class:`~fedvp_jax.algorithms.FedGenState`)."""

Batch = tuple[jax.Array, ...]
"""A minibatch ``(history: f32[batch, M, 3], future: f32[batch, H, 3], *extra)``; FedGen adds
its clients' sampled labels ``f32[gen_batch, 3]``. With leading ``[clients, steps]`` axes when
it holds every step of every client."""
