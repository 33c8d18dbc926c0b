"""What every command shares: logging to stdout, the device, one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator


def command_parser(doc: str, prog: str | None) -> argparse.ArgumentParser:
  """A command's parser: its docstring's first paragraph as the description, the rest (the
  examples) after the options, one spelling per flag."""
  from fedvp_jax.cli.flags import HelpFormatter

  return argparse.ArgumentParser(
    prog=prog,
    description=doc.split("\n\n", maxsplit=1)[0],
    formatter_class=HelpFormatter,
    epilog="\n\n".join(doc.split("\n\n")[1:]),
    allow_abbrev=False,
  )


def add_run_options(p: argparse.ArgumentParser) -> None:
  """Options of how a run executes (not settings of what it computes)."""
  p.add_argument(
    "--device", default="cpu", help="cpu, or cuda/gpu (CPU with a warning when there is no GPU)"
  )
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
  p.add_argument(
    "--checkpoint-every",
    "--checkpoint_every",
    dest="checkpoint_every",
    type=_positive_int,
    metavar="K",
    help="save the whole state every K rounds (orbax), so that an interrupted run resumes",
  )
  p.add_argument(
    "--tensorboard",
    action="store_true",
    help="also write every round's numbers as TensorBoard event files into the run directory",
  )


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
  return value


@contextlib.contextmanager
def on_device(name: str) -> Iterator[None]:
  """Runs the block with JAX's default device set from ``--device``."""
  import jax

  if name in ("cuda", "gpu"):
    try:
      device = jax.devices("gpu")[0]
    except RuntimeError:
      warnings.warn(f"--device {name}: no GPU is visible to JAX; running on the CPU", stacklevel=2)
      device = jax.devices("cpu")[0]
  elif name == "cpu":
    device = jax.devices("cpu")[0]
  else:
    raise SystemExit(f"error: --device {name!r}: choose cpu, cuda or gpu")
  with jax.default_device(device):
    yield


def command(body: Callable[[], int]) -> int:
  """Runs a command's body with the library's lines on stdout; a bad input is one line on
  stderr and exit code 2, never a traceback."""
  from fedvp_jax.config import SCHEMA
  from fedvp_jax.errors import FedVPError, SettingError

  logger = logging.getLogger("fedvp_jax")
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False  # a dependency may have configured the root logger too
  try:
    return body()
  except SettingError as err:  # found at run time (the data has too few viewers): name the flag
    name = SCHEMA[err.setting].flag if err.setting in SCHEMA else err.setting
    shown = "" if err.value is None else f" {err.value}"
    print(f"error: {name}{shown}: {err.reason}", file=sys.stderr)
    return 2
  except FedVPError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except OSError as err:  # a full disk, a read-only folder: say which file, not a traceback
    print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
    return 2
  finally:
    logger.removeHandler(handler)
    logger.propagate = True


__all__ = ["add_run_options", "command", "command_parser", "on_device"]
