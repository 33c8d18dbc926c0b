"""``python -m fedvp_jax.flower simulate | serve | client``: the ``fedvp-flower`` command."""

import sys

from fedvp_jax.flower.cli import main

if __name__ == "__main__":
  sys.exit(main())
