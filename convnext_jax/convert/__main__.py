"""`python -m convnext_jax.convert`: see `convnext_jax.convert.cli`."""

import sys

from convnext_jax.convert import cli

if __name__ == '__main__':
  sys.exit(cli.main())
