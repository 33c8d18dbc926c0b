"""Viewport-prediction models as pure functions over parameter pytrees."""

from .functional import Model, build_model, functional, split_once
from .generator import (
  DeepGenerator,
  Generator,
  LabelEncoding,
  ResidualBlock,
  SimpleGenerator,
  build_generator,
)
from .head import Head, ViewportModel, motion_features
from .lstm import LSTMEncoder
from .transformer import EncoderBlock, TransformerEncoder

__all__ = [
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
