"""What every command shares: logging to stdout, the device, one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
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
  job = p.add_argument_group(
    "several processes",
    "run one job over several processes or hosts (jax.distributed): every process runs the "
    "same command with its own --process-id; under SLURM, Open MPI or Kubernetes leave these "
    "out (JAX reads them from the cluster); see docs/multihost.md",
  )
  job.add_argument(
    "--coordinator", metavar="HOST:PORT", help="address of process 0, which serves the job"
  )
  job.add_argument(
    "--num-processes", dest="num_processes", type=_positive_int, metavar="P", help="processes"
  )
  job.add_argument(
    "--process-id", dest="process_id", type=int, metavar="I", help="this process, 0 to P-1"
  )


def join_job(args: argparse.Namespace) -> None:
  """Joins the job of several processes that the flags (or the cluster) describe, if any;
  then only process 0 logs and draws progress."""
  from fedvp_jax import distributed
  from fedvp_jax.rundir import is_process_zero

  distributed.start(args.coordinator, args.num_processes, args.process_id)
  if not is_process_zero():
    logging.getLogger("fedvp_jax").setLevel(logging.WARNING)
    args.progress = False


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
  return value


@contextlib.contextmanager
def on_device(name: str) -> Iterator[None]:
  """Runs the block with JAX's default device set from ``--device``."""
  import jax

  # This process's own first device: in a job of several processes, jax.devices() lists the
  # others' too, and a default device of another process would hold nothing this one makes.
  if name in ("cuda", "gpu"):
    try:
      device = jax.local_devices(backend="gpu")[0]
    except RuntimeError:
      warnings.warn(f"--device {name}: no GPU is visible to JAX; running on the CPU", stacklevel=2)
      device = jax.local_devices(backend="cpu")[0]
  elif name == "cpu":
    device = jax.local_devices(backend="cpu")[0]
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
    code = body()
    distributed = sys.modules.get("fedvp_jax.distributed")  # imported by join_job
    if distributed is not None:
      distributed.finish()
    return code
  except SettingError as err:  # found at run time (the data has too few viewers): name the flag
    name = SCHEMA[err.setting].flag if err.setting in SCHEMA else err.setting
    shown = "" if err.value is None else f" {err.value}"
    return _failed(f"error: {name}{shown}: {err.reason}")
  except FedVPError as err:
    return _failed(f"error: {err}")
  except OSError as err:  # a full disk, a read-only folder: say which file, not a traceback
    return _failed(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "))
  except Exception as err:
    failure = _peer_failure(err)
    if failure is None:
      raise
    return _failed(f"error: {failure}")
  finally:
    logger.removeHandler(handler)
    logger.propagate = True


def _peer_failure(err: Exception) -> Exception | None:
  """In a job of several processes, what an error caused by a dead process means
  (:func:`fedvp_jax.distributed.peer_failure`)."""
  distributed = sys.modules.get("fedvp_jax.distributed")  # imported by join_job
  return None if distributed is None else distributed.peer_failure(err)


def _failed(line: str) -> int:
  """Prints ``line`` on stderr; the command's exit code (2). A process of a job of several
  exits at once: the others, waiting for it in a collective, then stop and name it, rather
  than everyone waiting for a goodbye that never comes."""
  print(line, file=sys.stderr)
  distributed = sys.modules.get("fedvp_jax.distributed")
  if distributed is not None and distributed.is_multiprocess():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  return 2


__all__ = ["add_run_options", "command", "command_parser", "join_job", "on_device"]
