"""fedvp_jax: federated viewport prediction for 360-degree video, in JAX.

The public API: code lives in the submodules, the names users build with are re-exported here
(listed in ``__init__.pyi``). They load on first use, so ``import fedvp_jax`` is cheap and
``import fedvp_jax.geometry`` imports only what geometry needs.
"""

import lazy_loader

__version__ = "0.2.0"

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
