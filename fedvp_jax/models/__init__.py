"""Viewport-prediction models as pure functions over parameter pytrees."""

from fedvp_jax.models.functional import MODELS, Model, build_model, functional, split_once
from fedvp_jax.models.generator import (
  GENERATORS,
  DeepGenerator,
  Generator,
  LabelEncoding,
  ResidualBlock,
  SimpleGenerator,
  build_generator,
)
from fedvp_jax.models.head import MOTION_DIM, Head, ViewportModel, motion_features
from fedvp_jax.models.lstm import LSTMEncoder
from fedvp_jax.models.transformer import EncoderBlock, TransformerEncoder

__all__ = [
  "GENERATORS",
  "MODELS",
  "MOTION_DIM",
  "DeepGenerator",
  "EncoderBlock",
  "Generator",
  "Head",
  "LSTMEncoder",
  "LabelEncoding",
  "Model",
  "ResidualBlock",
  "SimpleGenerator",
  "TransformerEncoder",
  "ViewportModel",
  "build_generator",
  "build_model",
  "functional",
  "motion_features",
  "split_once",
]
