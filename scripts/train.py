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
import math
import sys
from pathlib import Path

import jax

from fedvp_jax.algorithms import ALGORITHMS, RESEARCHER_NAMES, FedGenConfig
from fedvp_jax.data.windows import SPLITS
from fedvp_jax.errors import FedVPError
from fedvp_jax.models import MODELS
from fedvp_jax.models.generator import GENERATORS
from fedvp_jax.training import OPTIMIZERS, RunConfig, resolve_device, resume, run


def algorithm_name(text: str) -> str:
  """Our algorithm names, or the researcher's (``FedAvg``, ``partialFedGen``, ...)."""
  name = RESEARCHER_NAMES.get(text, text.lower())
  if name not in ALGORITHMS:
    known = sorted(set(ALGORITHMS) | set(RESEARCHER_NAMES))
    raise argparse.ArgumentTypeError(
      f"unknown algorithm {text!r}; choose one of {', '.join(known)}"
    )
  return name


def model_name(text: str) -> str:
  if text.lower() not in MODELS:
    raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose one of {', '.join(MODELS)}")
  return text.lower()


def beta_value(text: str) -> float:
  value = float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(
      f"{text}: beta must be in (0, 1] (1 overwrites, smaller blends)"
    )
  return value


def at_least(minimum: int):
  def parse(text: str) -> int:
    value = int(text)
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{text}: must be at least {minimum}")
    return value

  return parse


def positive_float(text: str) -> float:
  value = float(text)
  if not 0 < value < math.inf:
    raise argparse.ArgumentTypeError(f"{text}: must be a positive, finite number")
  return value


def non_negative_float(text: str) -> float:
  value = float(text)
  if not 0 <= value < math.inf:
    raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0")
  return value


def run_name(text: str) -> str:
  """A run directory name: one plain path component, so --overwrite can only replace it."""
  if not text or text in (".", "..") or "/" in text or "\\" in text:
    raise argparse.ArgumentTypeError(
      f"{text!r}: must be a plain folder name (no '/', not '.' or '..')"
    )
  return text


def user_list(text: str) -> tuple[str, ...]:
  users = tuple(u.strip() for u in text.split(",") if u.strip())
  if not users:
    raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated viewer names")
  return users


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
  p.add_argument(
    "--algo",
    "--algorithm",
    dest="algo",
    type=algorithm_name,
    default="fedavg",
    help=f"{', '.join(ALGORITHMS)} (or FedAvg, partialFedAvg, FedGen, ...)",
  )
  p.add_argument(
    "--dataset",
    default="Synthetic-m10-h1",
    help="<Name>-m<M>-h<H>: M past samples in, H future samples out, 0.2 s apart "
    "(default %(default)s)",
  )
  p.add_argument(
    "--data-dir",
    "--data_dir",
    dest="data_dir",
    help="data root holding dataset folders (default: $FEDVP_DATA)",
  )
  p.add_argument(
    "--model",
    type=model_name,
    default="transformer",
    help="lstm or transformer (default %(default)s)",
  )
  p.add_argument(
    "--rounds",
    "--num_glob_iters",
    dest="rounds",
    type=at_least(1),
    default=100,
    help="federated rounds (default %(default)s)",
  )
  p.add_argument(
    "--local_epochs",
    "--local-epochs",
    dest="local_epochs",
    type=at_least(1),
    default=10,
    help="local minibatch steps per client per round; one 'epoch' is one minibatch, as in "
    "FedGen's code (default %(default)s)",
  )
  p.add_argument(
    "--batch_size",
    "--batch-size",
    dest="batch_size",
    type=at_least(1),
    default=64,
    help="windows per minibatch (default %(default)s)",
  )
  p.add_argument(
    "--learning_rate",
    "--learning-rate",
    dest="learning_rate",
    type=positive_float,
    default=0.01,
    help="client learning rate (default %(default)s)",
  )
  p.add_argument(
    "--optimizer", choices=OPTIMIZERS, default="sgd", help="client optimizer (default %(default)s)"
  )
  p.add_argument(
    "--num_users",
    "--num-users",
    dest="num_users",
    type=at_least(1),
    default=10,
    help="viewers drawn as clients, seeded (default %(default)s)",
  )
  p.add_argument(
    "--users",
    type=user_list,
    help="comma-separated viewer names to use as clients (overrides --num_users)",
  )
  p.add_argument(
    "--clients-per-round",
    "--clients_per_round",
    dest="clients_per_round",
    type=at_least(1),
    help="clients sampled to train each round (default: all)",
  )
  p.add_argument(
    "--beta",
    type=beta_value,
    default=1.0,
    help="clients take beta*server + (1-beta)*own (default %(default)s)",
  )
  p.add_argument(
    "--split",
    choices=SPLITS,
    default="video",
    help="train/test split of each viewer's windows (default %(default)s)",
  )
  p.add_argument(
    "--latent-dim",
    "--latent_dim",
    dest="latent_dim",
    type=at_least(7),
    default=32,
    help="size of the latent z (default %(default)s)",
  )
  p.add_argument(
    "--eval-every",
    "--eval_every",
    dest="eval_every",
    type=at_least(1),
    default=1,
    help="evaluate every k rounds (default %(default)s)",
  )
  p.add_argument(
    "--times",
    type=at_least(1),
    default=1,
    help="repeat with seeds seed, seed+1, ...; reports mean ± std (default %(default)s)",
  )
  p.add_argument(
    "--seed", type=at_least(0), default=0, help="seed of the first run (default %(default)s)"
  )
  p.add_argument(
    "--device", default="cpu", help="cpu, or cuda/gpu (CPU with a warning when there is no GPU)"
  )
  p.add_argument(
    "--devices",
    type=at_least(1),
    help="split the clients over this many devices of that kind (default: one device)",
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
    "(the other training flags are ignored)",
  )

  g = p.add_argument_group(
    "FedGen", "used by fedgen, local-fedgen and partial-fedgen; accepted by every algorithm"
  )
  g.add_argument(
    "--generator",
    choices=GENERATORS,
    default="simple",
    help="simple (FedGen's) or deep (residual MLP)",
  )
  g.add_argument(
    "--embedding",
    action="store_true",
    help="condition the generator on a learned embedding of the label's heatmap cell",
  )
  g.add_argument(
    "--grain",
    type=at_least(4),
    default=256,
    help="heatmap grid: GRAIN longitude x GRAIN/2 latitude cells (default %(default)s)",
  )
  g.add_argument(
    "--heatmap-sigma",
    "--heatmap_sigma",
    dest="heatmap_sigma",
    type=positive_float,
    default=5.0,
    help="heatmap blur in degrees (default %(default)s)",
  )
  g.add_argument(
    "--gen_batch_size",
    "--gen-batch-size",
    dest="gen_batch_size",
    type=at_least(1),
    default=256,
    help="generated labels per client step (default %(default)s)",
  )
  g.add_argument(
    "--gen-steps",
    "--gen_steps",
    dest="gen_steps",
    type=at_least(1),
    default=50,
    help="generator steps per round (default %(default)s)",
  )
  g.add_argument(
    "--gen-learning-rate",
    "--ensemble_lr",
    dest="gen_learning_rate",
    type=positive_float,
    default=1e-3,
    help="generator Adam learning rate, decayed 0.98 per round (FedGen: 1e-4; default %(default)s)",
  )
  g.add_argument(
    "--alpha",
    "--generative_alpha",
    dest="alpha",
    type=non_negative_float,
    default=1.0,
    help="initial weight of the clients' generator term (FedGen: 10; default %(default)s)",
  )
  g.add_argument(
    "--latent-weight",
    "--generative_beta",
    dest="latent_weight",
    type=non_negative_float,
    default=0.0,
    help="initial weight of FedGen's latent term; 0 is off (default %(default)s)",
  )
  g.add_argument(
    "--diversity-weight",
    "--diversity_weight",
    dest="diversity_weight",
    type=non_negative_float,
    default=0.0,
    help="weight of FedGen's diversity loss (default %(default)s)",
  )
  g.add_argument(
    "--pretrain-epochs",
    "--pretrain_epochs",
    dest="pretrain_epochs",
    type=at_least(0),
    default=0,
    help="stage-one rounds in which clients train without the generator while the server "
    "already trains it; added before --rounds (default %(default)s)",
  )
  g.add_argument(
    "--gen-warmup",
    "--gen_warmup",
    dest="gen_warmup",
    type=at_least(0),
    default=0,
    help="rounds over which alpha ramps up from 0 after stage one (default %(default)s)",
  )
  return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
  return RunConfig(
    algo=args.algo,
    dataset=args.dataset,
    data_dir=args.data_dir,
    model=args.model,
    rounds=args.rounds,
    local_epochs=args.local_epochs,
    batch_size=args.batch_size,
    learning_rate=args.learning_rate,
    optimizer=args.optimizer,
    num_users=args.num_users,
    users=args.users,
    clients_per_round=args.clients_per_round,
    beta=args.beta,
    split=args.split,
    latent_dim=args.latent_dim,
    eval_every=args.eval_every,
    times=args.times,
    seed=args.seed,
    devices=args.devices,
    fedgen=FedGenConfig(
      generator=args.generator,
      embedding=args.embedding,
      grain=args.grain,
      heatmap_sigma=args.heatmap_sigma,
      gen_batch_size=args.gen_batch_size,
      gen_steps=args.gen_steps,
      gen_learning_rate=args.gen_learning_rate,
      alpha=args.alpha,
      latent_weight=args.latent_weight,
      diversity_weight=args.diversity_weight,
      pretrain_epochs=args.pretrain_epochs,
      gen_warmup=args.gen_warmup,
    ),
  )


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
        resume(args.resume, progress=args.progress)
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
