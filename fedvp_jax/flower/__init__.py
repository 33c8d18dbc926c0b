"""fedvp_jax's algorithms as a Flower app (the ``flower`` extra): the same client update and
server aggregation as the vmapped rounds, one process per client, over the network.

* :mod:`fedvp_jax.flower.wire`: params as named arrays, with a structure check (no Flower).
* :mod:`fedvp_jax.flower.setup`: what both ends build from a run's config (no Flower).
* :mod:`fedvp_jax.flower.client`: the ``ClientApp`` (imports ``flwr``).
* :mod:`fedvp_jax.flower.server`: the ``ServerApp`` (imports ``flwr``).
* :mod:`fedvp_jax.flower.cli`: ``fedvp-flower simulate | serve | client``.

Importing this package does not import Flower; the core (``import fedvp_jax``) never does.
See docs/flower.md.
"""
