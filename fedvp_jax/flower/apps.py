"""The Flower app objects: ``client_app`` (a ``ClientApp`` whose ``query``, ``train`` and
``evaluate`` handlers are :func:`fedvp_jax.flower.client.hello`,
:func:`fedvp_jax.flower.client.train` and :func:`fedvp_jax.flower.client.evaluate`) and
``server_app`` (a ``ServerApp`` whose main is :func:`fedvp_jax.flower.server.main`). The
one module that imports Flower when imported: Flower loads the apps by these names
(``fedvp_jax.flower.apps:client_app``, ``fedvp_jax.flower.apps:server_app``)."""

from __future__ import annotations

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedvp_jax.flower import client, server

client_app = ClientApp()
client_app.query()(client.hello)
client_app.train()(client.train)
client_app.evaluate()(client.evaluate)

server_app = ServerApp()
server_app.main()(server.main)

__all__ = ["client_app", "server_app"]
