"""A run's per-round scalars as TensorBoard event files (``<run>/tensorboard/seed<k>/``),
written with tensorboardX (the ``tensorboard`` extra): ``tensorboard --logdir RUN_DIR``."""

from __future__ import annotations

from typing import Any

from fedvp_jax.errors import ConfigError
from fedvp_jax.rundir import TENSORBOARD, RunDir


class TensorBoardLog:
  """One event-file writer per seed of a run."""

  def __init__(self, target: RunDir):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      raise ConfigError(
        "the TensorBoard log needs tensorboardX: pip install 'fedvp_jax[tensorboard]'"
      ) from None
    seeds = target.read_record()["config"]
    first, count = seeds["seed"], seeds["num_seeds"]
    self._writers = [
      SummaryWriter(str(target.path / TENSORBOARD / f"seed{seed}"))
      for seed in range(first, first + count)
    ]

  def add_round(self, records: list[dict[str, Any]]) -> None:
    """Adds every number of one round's records, one record per seed."""
    for writer, record in zip(self._writers, records, strict=True):
      step = record["round"]
      for name, value in record.items():
        if isinstance(value, float):
          writer.add_scalar(name, value, step)
      for k, degrees in enumerate(record.get("test_orthodromic_deg") or []):
        if degrees is not None:
          writer.add_scalar(f"test_orthodromic_deg/step{k + 1}", degrees, step)

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


__all__ = ["TensorBoardLog"]
