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
  """Training diverged: every client's update in a round was non-finite, or the deployed models
  are no better than a random direction (see :func:`fedvp_jax.rounds.diverged_models`)."""


class SettingError(ConfigError):
  """A setting's value is impossible. Names the quantity (``beta``), never a flag, so that the
  command line can name its flag and a sweep its spec file and key.

  Attributes:
    setting: the setting's name (see :data:`fedvp_jax.config.SCHEMA`).
    value: the value given (``None`` when the name itself is wrong).
    reason: what is wrong with it.
  """

  def __init__(self, setting: str, value: object, reason: str):
    self.setting, self.value, self.reason = setting, value, reason
    shown = "" if value is None else f" {value!r}" if isinstance(value, str) else f" {value}"
    super().__init__(f"{setting}{shown}: {reason}")


class JobError(FedVPError):
  """The processes of a multi-process run disagree (their configurations differ), or one of
  them died (see :mod:`fedvp_jax.distributed`)."""
