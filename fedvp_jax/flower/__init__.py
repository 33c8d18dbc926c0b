"""fedvp_jax's algorithms as a Flower app (the ``flower`` extra): the same client update and
server aggregation as the vmapped rounds, one process per client, over the network.

* :mod:`fedvp_jax.flower.wire`: params as named arrays, with a structure check (no Flower).
* :mod:`fedvp_jax.flower.setup`: what both ends build from a run's config (no Flower).
* :mod:`fedvp_jax.flower.client`: the client's handlers (receive, evaluate, train, reply).
* :mod:`fedvp_jax.flower.server`: the server's rounds (keys, aggregation, FedGen's generator).
* :mod:`fedvp_jax.flower.simulation`: all clients on one machine (Flower's simulation engine).
* :mod:`fedvp_jax.flower.deploy`: a SuperLink and SuperNodes (Flower's deployment engine).
* :mod:`fedvp_jax.flower.cli`: ``fedvp-flower simulate | serve | client``.
* :mod:`fedvp_jax.flower.apps`: the ``ClientApp`` and ``ServerApp`` objects Flower loads; the
  only module that imports ``flwr`` when imported (the others import it when they run).

The core (``import fedvp_jax``) never imports Flower.
See docs/flower.md.
"""
