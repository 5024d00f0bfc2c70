"""Command-line entry point: `python -m kforcing_jax SUBCOMMAND [flags]`.

Subcommands:
  train-teacher  --config=configs/X.py --workdir=W   train (or resume) the AR teacher
  generate       --workdir=W --prompt=TEXT [--k=4]   decode from a trained model
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from kforcing_jax import commands

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py); override fields '
    'with --config.section.field=value.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, '
                    'tokenizer, reports).')
flags.DEFINE_multi_string('prompt', [], 'generate: a prompt (repeatable).')
flags.DEFINE_integer('k', 1, 'generate: tokens per forward pass (1 = AR).')
flags.DEFINE_string('model', '', "generate: 'teacher' or 'student_kN'; "
                    'default: teacher for k=1, else the smallest student '
                    'window >= k.')
flags.DEFINE_integer('max_new_tokens', None, 'generate: new tokens per prompt '
                     '(default: config decode.max_new_tokens).')
flags.DEFINE_float('temperature', None, 'generate: AR sampling temperature.')
flags.DEFINE_bool('greedy', None, 'generate: AR argmax decoding.')
flags.DEFINE_float('frequency_penalty', None, 'generate: push-forward '
                   'frequency penalty lambda.')
flags.DEFINE_integer('seed', None, 'generate: seed of the decoding noise.')

FLAGS = flags.FLAGS

SUBCOMMANDS = {
    'train-teacher': commands.train_teacher,
    'generate': commands.generate,
}


def _usage() -> str:
  return ('usage: python -m kforcing_jax {' + ','.join(SUBCOMMANDS) +
          '} --workdir=W [--config=configs/X.py] [flags]')


def _run(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    got = ' '.join(argv[1:]) or '(none)'
    raise app.UsageError(f'unknown or missing subcommand: {got}\n{_usage()}')
  if not FLAGS.workdir:
    raise app.UsageError(f'--workdir is required\n{_usage()}')
  SUBCOMMANDS[argv[1]](FLAGS)


def main():
  app.run(_run, argv=sys.argv)
