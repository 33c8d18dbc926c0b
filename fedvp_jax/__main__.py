"""``python -m fedvp_jax train | sweep | report``: the ``fedvp`` command."""

import sys

from fedvp_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
