"""fedvp train: train a federated viewport-prediction model.

Examples:
  fedvp train --algorithm fedavg --dataset Synthetic-m10-h1 --rounds 50
  fedvp train --algorithm fedgen --pretrain-rounds 200
  fedvp train --train --dataset David-m10-h1 --algorithm partialFedAvg --beta 0.5 \\
      --model Transformer --device cuda --learning_rate 0.01 --batch_size 64 --times 1 \\
      --num_glob_iters 300 --local_epochs 10 --num_users 10 --data-dir ../shared/data
  fedvp train --resume runs/long

The researcher's FedGen-style flags are accepted as written (--algorithm FedAvg,
--num_glob_iters, --local_epochs, --times, --train, ...). Everything this command does is
fedvp_jax.run / fedvp_jax.resume from Python.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

from fedvp_jax.cli.common import add_run_options, command, command_parser, join_job, on_device
from fedvp_jax.cli.flags import add_settings, config_from, given_settings
from fedvp_jax.config import SCHEMA

RESUME_MAY_CHANGE = ("data_dir", "devices")
"""Settings a resumed run may take anew: where its data lives and how clients are placed."""


def run_name(text: str) -> str:
  """A run directory name: one plain path component, so --overwrite can only replace it."""
  if not text or text in (".", "..") or "/" in text or "\\" in text:
    raise argparse.ArgumentTypeError(
      f"{text!r}: must be a plain folder name (no '/', not '.' or '..')"
    )
  return text


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  p = command_parser(__doc__, prog)
  p.add_argument("--train", action="store_true", help="accepted for the researcher's commands")
  p.add_argument(
    "--out", default="runs", help="folder that run directories are created in (default runs)"
  )
  p.add_argument(
    "--name", type=run_name, help="run directory name (default: <algorithm>_<dataset>_<time>)"
  )
  p.add_argument(
    "--overwrite", action="store_true", help="replace an existing run directory of the same name"
  )
  p.add_argument(
    "--resume",
    metavar="RUN_DIR",
    help="continue an interrupted run from its checkpoints, with its saved settings; of the "
    "settings only --data-dir and --devices may be given (the data moved, other hardware)",
  )
  add_run_options(p)
  add_settings(p)
  return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  parser = build_parser(prog)
  args = parser.parse_args(argv)
  settings = given_settings(args)
  if args.resume:
    refused = [SCHEMA[name].flag for name in settings if name not in RESUME_MAY_CHANGE]
    if refused:
      parser.error(
        f"--resume continues the run with its saved settings; {', '.join(refused)} cannot "
        "change (start a new run instead)"
      )
    return command(lambda: _resume(args, settings))
  config = config_from(parser, settings)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  # A dataset name is a plain folder name, but keep the default run name one path component.
  dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset)
  name = args.name or f"{config.algorithm}_{dataset}_{config.model}_{stamp}"

  def body() -> int:
    from fedvp_jax.cli.progress import follow
    from fedvp_jax.distributed import agree
    from fedvp_jax.runner import run_steps

    join_job(args)
    with on_device(args.device):
      steps = run_steps(
        config,
        Path(args.out) / agree(name),  # process 0's clock names the run
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        tensorboard=args.tensorboard,
      )
      follow(steps, args.progress)
    return 0

  return command(body)


def _resume(args: argparse.Namespace, settings: dict) -> int:
  from fedvp_jax.cli.progress import follow
  from fedvp_jax.runner import resume_steps

  devices = settings.get("devices")
  join_job(args)
  with on_device(args.device):
    steps = resume_steps(
      args.resume,
      devices=None if devices is None else SCHEMA["devices"].coerce(devices, from_text=True),
      data_dir=settings.get("data_dir"),
      checkpoint_every=args.checkpoint_every,
      tensorboard=args.tensorboard,
    )
    follow(steps, args.progress)
  return 0


__all__ = ["RESUME_MAY_CHANGE", "build_parser", "main", "run_name"]

if __name__ == "__main__":
  sys.exit(main())
