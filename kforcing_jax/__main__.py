"""`python -m kforcing_jax SUBCOMMAND --flags`."""

from kforcing_jax import cli

if __name__ == '__main__':
  cli.main()
