#!/usr/bin/env python3
"""Train a federated viewport-prediction model.

Examples:
  python scripts/train.py --algo fedavg --dataset Synthetic-m10-h1 --rounds 50
  python scripts/train.py --algo fedgen --pretrain-epochs 200
  python scripts/train.py --train --dataset David-m10-h1 --algorithm partialFedAvg --beta 0.5 \
      --model Transformer --device cuda --learning_rate 0.01 --batch_size 64 --times 1 \
      --num_glob_iters 300 --local_epochs 10 --num_users 10 --data-dir ../shared/data

The researcher's FedGen-style flags are accepted as written (``--algorithm FedAvg``,
``--num_glob_iters``, ``--train``, ...). Everything this script does is available from Python
as :func:`fedvp_jax.training.run`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import jax

from fedvp_jax.cli import add_config_arguments, at_least, config_from_args, run_name
from fedvp_jax.errors import FedVPError
from fedvp_jax.training import resolve_device, resume, run


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
  )
  p.add_argument(
    "--train",
    action="store_true",
    help="accepted for the researcher's commands; training is what this script does",
  )
  add_config_arguments(p)
  p.add_argument(
    "--device", default="cpu", help="cpu, or cuda/gpu (CPU with a warning when there is no GPU)"
  )
  p.add_argument(
    "--out", default="runs", help="folder that run directories are created in (default %(default)s)"
  )
  p.add_argument(
    "--name", type=run_name, help="run directory name (default: <algo>_<dataset>_<model>_<time>)"
  )
  p.add_argument(
    "--overwrite", action="store_true", help="replace an existing run directory of the same name"
  )
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
  p.add_argument(
    "--checkpoint-every",
    "--checkpoint_every",
    dest="checkpoint_every",
    type=at_least(1),
    help="save the whole state every K rounds (orbax), so that --resume can continue the run",
  )
  p.add_argument(
    "--resume",
    metavar="RUN_DIR",
    help="continue an interrupted run from its checkpoints, with its saved settings "
    "(the other training flags are ignored, except --device and --devices)",
  )

  return p


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  config = config_from_args(args)
  try:
    config.check()
  except FedVPError as err:
    parser.error(str(err))
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  name = args.name or f"{config.algo}_{config.dataset}_{config.model}_{stamp}"
  try:
    with jax.default_device(resolve_device(args.device)):
      if args.resume:
        resume(args.resume, devices=args.devices, progress=args.progress)
      else:
        run(
          config,
          Path(args.out) / name,
          overwrite=args.overwrite,
          checkpoint_every=args.checkpoint_every,
          progress=args.progress,
        )
  except FedVPError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
