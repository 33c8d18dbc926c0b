"""Viewpoint heatmaps on an equirectangular grid, for FedGen-style label generation."""

import lazy_loader

# Submodules load on first use (names in __init__.pyi), so importing one module of the
# package does not import the others (and JAX with them).
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
