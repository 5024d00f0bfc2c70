"""Command-line entry point: `python -m kforcing_jax SUBCOMMAND [flags]`.

Subcommands:
  pipeline       --config=configs/X.py --workdir=W   the main job: teacher, distill, [train-evaluator], evaluate, bench, report
  train-teacher  --config=configs/X.py --workdir=W   train (or resume) the AR teacher
  distill        --config=configs/X.py --workdir=W   students of each distill.windows (1, 2, 4) from W/teacher
  generate       --workdir=W --prompt=TEXT [--k=4]   decode from a trained model
  train-evaluator --config=configs/X.py --workdir=W  small independent GPT-2-shape evaluator -> W/evaluator
  evaluate       --config=configs/X.py --workdir=W   quality metrics -> W/eval.json, W/samples/
  bench          --config=configs/X.py --workdir=W   AR vs k-token decoding speed -> W/bench.json/png
  report         --workdir=W                         W/report.md from what W holds (pipeline ends with it)
  --help, -h     this text; `SUBCOMMAND --help` adds that subcommand's summary
"""

import os
import signal
import sys
import time

from absl import app
from absl import logging
from absl import flags
import jax
from ml_collections import config_flags

from kforcing_jax import checkpoints
from kforcing_jax import commands
from kforcing_jax import config_files
from kforcing_jax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py); override fields '
    'with --config.section.field=value.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, '
                    'tokenizer, reports).')
flags.DEFINE_multi_string('prompt', [], 'generate: a prompt (repeatable; '
                          "default: 'The').")
flags.DEFINE_integer('k', 1, 'generate: tokens per forward pass (1: the AR '
                     'teacher, unless --model names a student).')
flags.DEFINE_string('model', '', "generate: 'teacher' or 'student_kN'; "
                    'default: teacher for k=1, else the smallest student '
                    'window >= k.')
flags.DEFINE_integer('max_new_tokens', None, 'generate: new tokens per prompt '
                     '(default: config decode.max_new_tokens).')
flags.DEFINE_float('temperature', None, 'generate: sampling temperature of '
                   'the AR teacher and of a --readout=sample or =median '
                   'student (default: config decode.temperature).')
flags.DEFINE_bool('greedy', None, 'generate: AR argmax decoding (default: '
                  'config decode.greedy).')
flags.DEFINE_enum('readout', None, ['argmax', 'sample', 'median'],
                  "generate: a student's tokens: argmax of its slots, "
                  'sampled from its softmax at --temperature, or the median '
                  'of that softmax (default: config decode.readout).')
flags.DEFINE_float('frequency_penalty', None, 'generate: frequency penalty '
                   'lambda, students and the AR teacher alike (default: '
                   'config decode.frequency_penalty).')
flags.DEFINE_integer('seed', None, 'generate: seed of the decoding noise '
                     '(default: config decode.seed).')

FLAGS = flags.FLAGS

SUBCOMMANDS = {
    'train-teacher': commands.train_teacher,
    'generate': commands.generate,
    'distill': commands.distill_cmd,
    'train-evaluator': commands.train_evaluator_cmd,
    'evaluate': commands.evaluate_cmd,
    'bench': commands.bench_cmd,
    'pipeline': commands.pipeline_cmd,
    'report': commands.report_cmd,
}


def _usage() -> str:
  return ('usage: python -m kforcing_jax {' + ','.join(SUBCOMMANDS) +
          '} --workdir=W [--config=configs/X.py] [flags]\n'
          'python -m kforcing_jax --help: the subcommands and flags')


_HELP_FLAGS = ('-h', '--help')


def _help_text(argv) -> str:
  """The subcommand table and flags; with a subcommand, its summary first."""
  sub = next((a for a in argv[1:] if a in SUBCOMMANDS), None)
  parts = []
  if sub:
    summary = SUBCOMMANDS[sub].__doc__.strip().splitlines()[0]
    parts += [f'python -m kforcing_jax {sub}: {summary}', '']
  parts += [
      __doc__.strip(), '', 'Flags:', FLAGS.module_help(__name__).strip(), '',
      'Config fields: --config.SECTION.FIELD=VALUE overrides a field of the '
      'config file;', 'kforcing_jax/defaults.py lists every field with its '
      'default and meaning.', 'Presets: configs/tiny.py (tests), '
      'configs/demo.py (the 30-minute CPU demo), configs/lm1b.py and '
      'configs/owt.py (the paper setups).', '',
      'Compile-only memory check at paper scale, no params allocated: '
      'python -m kforcing_jax.aot --help']
  return '\n'.join(parts)


def _wants_help(argv) -> bool:
  """-h/--help anywhere before `--`, or `help` in the subcommand's place
  (not later, where it may be a flag's value: `--prompt help`)."""
  args = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  return any(a in _HELP_FLAGS for a in args) or args[:1] == ['help']


def _run(argv):
  # Orbax logs every file rename at INFO; keep the console for progress.
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 2 and argv[1] in SUBCOMMANDS:
    # E.g. an unquoted multi-word --prompt: the rest became positional.
    raise app.UsageError(f'unexpected argument(s) after {argv[1]}: '
                         f"{' '.join(argv[2:])} (quote a value with spaces)\n"
                         f'{_usage()}')
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    got = ' '.join(argv[1:]) or '(none)'
    hint = ('\nthe compile-only memory check is its own module: python -m '
            'kforcing_jax.aot --help') if argv[1:2] == ['aot'] else ''
    raise app.UsageError(f'unknown or missing subcommand: {got}{hint}\n'
                         f'{_usage()}')
  if not FLAGS.workdir:
    raise app.UsageError(f'--workdir is required\n{_usage()}')
  # The shell leaves ~ in --workdir=~/x as it is: it became a folder ./~.
  FLAGS.workdir = os.path.expanduser(FLAGS.workdir)
  _check_workdir(FLAGS.workdir)
  sharding.check_shared_workdir(FLAGS.workdir)
  return SUBCOMMANDS[argv[1]](FLAGS) or 0


def _check_workdir(workdir: str) -> None:
  """Before any work: a workdir that is (or lies under) a file would fail
  only when the first result is saved, e.g. after training an evaluator."""
  if '://' in workdir:
    # os.path would make gs://b/x the local folder ./gs:/b/x, silently.
    raise app.UsageError(
        f'--workdir={workdir} is a URL; checkpoints and results are written '
        'through the file system: mount the bucket (e.g. gcsfuse) and pass '
        'the mount path')
  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = '' if path == os.path.abspath(workdir) else f' ({path} is)'
    raise app.UsageError(f'--workdir={workdir} is not a directory: a file '
                         f'is in the way{where}')


def out_of_memory(e: BaseException) -> str | None:
  """A one-line error for an accelerator (or host) out of memory, else
  None: XLA's RESOURCE_EXHAUSTED ended the run in a traceback."""
  text = str(e)
  if not text.startswith('RESOURCE_EXHAUSTED'):
    return None
  return (f'out of memory: {text.splitlines()[0]} Lower the batch size of '
          'the stage that ran out (train.batch_size, distill.batch_size, '
          'distill.num_windows, eval.batch_size, bench.batch_sizes) or add '
          'devices; python -m kforcing_jax.aot estimates a training step\'s '
          'memory without running it')


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  if jax.distributed.is_initialized():
    # One of several processes, e.g. data on one host's disk only. Exiting
    # normally would wait up to 5 minutes at JAX's shutdown barrier for the
    # others, which wait in their next collective for this one: end now,
    # so that a launcher sees the failure and stops them.
    print('error: this process stops here; the others stop once JAX\'s '
          'distributed service sees it gone', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access
  sys.exit(2)


def _fail_now(message: str):
  """`_fail` for a CheckpointError. After a damaged checkpoint, TensorStore's
  reads of it can still be pending, and their threads print pages of
  "Event loop is closed" tracebacks around the message until the process
  ends; so stderr is silenced, the message written past it, and the
  process ends at once (no atexit handlers). Nothing of ours is in
  flight: these errors come from restores and checks, and every save is
  awaited before them."""
  sys.stdout.flush()
  sys.stderr.flush()
  stderr = os.dup(2)  # Silence fd 2 first, then write the message past it.
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  # A thread already inside write(2) when fd 2 moved still writes to the
  # old stderr; let such writes land before the message, so it stays last
  # (seen once in CI on a loaded 2-core VM).
  time.sleep(0.1)
  os.write(stderr, f'error: {message}\n'.encode())
  os._exit(2)  # pylint: disable=protected-access


class _Terminated(BaseException):
  """SIGTERM outside a training loop (which saves and stops on its own).
  A BaseException, as KeyboardInterrupt is: a broad `except Exception`
  (orbax restores, config loading) must not turn it into another error."""


def _on_sigterm(signum, frame):
  del signum, frame
  raise _Terminated


def main():
  argv = sys.argv
  if _wants_help(argv):  # Before joining a cluster, which would wait.
    print(_help_text(argv))
    return
  try:
    # First of all: JAX joins a multi-process run only before its backends
    # start (KFORCING_COORDINATOR/..., or KFORCING_DISTRIBUTED=auto).
    sharding.maybe_initialize_distributed()
  except ValueError as e:
    _fail(str(e))
  try:
    argv = config_files.parse_flags(
        FLAGS, argv, ' (see kforcing_jax/defaults.py for every field)')
  except config_files.FlagsError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(f'{e}\n{_usage()}')
  # Training loops replace this with their save-and-stop handler while they
  # run; elsewhere (evaluate, bench, the evaluator's torch loop) SIGTERM
  # used to end the process with no word.
  if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    status = _run(argv)
  except _Terminated:
    sharding.print_once(
        'terminated (SIGTERM); re-run the same command: finished training '
        'stages and earlier results are kept, and the stage that was '
        'stopped (evaluate, bench, the evaluator) starts over',
        file=sys.stderr)
    sys.exit(commands.STOPPED_EXIT_CODE)
  except KeyboardInterrupt as e:
    sharding.print_once(f'interrupted{": " + str(e) if str(e) else ""}; '
                        're-run the same command to resume', file=sys.stderr)
    sys.exit(130)
  except app.UsageError as e:
    _fail(str(e))
  except checkpoints.CheckpointError as e:
    _fail_now(str(e))
  except (AssertionError, RuntimeError) as e:
    message = sharding.backend_failure(e) or out_of_memory(e)
    if message is None:
      raise
    _fail(message)
  except (ValueError, OSError, FloatingPointError,
          ImportError) as e:  # Optional extras name a fix.
    _fail(str(e))
  if status:  # A training command stopped by SIGTERM, after saving.
    sys.exit(status)
