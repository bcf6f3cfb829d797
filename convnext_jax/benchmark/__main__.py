"""`python -m convnext_jax.benchmark`: runs `cli.main`."""

from convnext_jax.benchmark import cli

if __name__ == '__main__':
  cli.main()
