"""Exceptions raised for bad input.

Every error a user can cause by pointing fedvp_jax at the wrong files or asking for something
impossible is one of these, with a message that names the file (and line), dataset or option
at fault and says what is wrong. Anything else escaping the library is a bug.
"""


class FedVPError(ValueError):
  """Base class of the errors that describe bad input."""


class DataError(FedVPError):
  """A trace file, split file, data root or dataset name is unusable."""


class ConfigError(FedVPError):
  """An impossible combination of options."""


class DivergenceError(FedVPError):
  """Training diverged: every client's update in a round was non-finite."""
