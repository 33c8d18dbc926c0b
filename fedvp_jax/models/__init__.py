"""Viewport-prediction models as pure functions over parameter pytrees."""

from fedvp_jax.models.functional import MODELS, Model, build_model, functional
from fedvp_jax.models.head import Head, ViewportModel, motion_features
from fedvp_jax.models.lstm import LSTMEncoder
from fedvp_jax.models.transformer import TransformerEncoder

__all__ = [
  "MODELS",
  "Head",
  "LSTMEncoder",
  "Model",
  "TransformerEncoder",
  "ViewportModel",
  "build_model",
  "functional",
  "motion_features",
]
