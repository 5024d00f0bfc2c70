#!/usr/bin/env python3
"""Cloud TPU pod helper: create a TPU VM slice and run kforcing_jax on it.

Every step is a `gcloud compute tpus tpu-vm ...` command; the ones that touch
the workers use `--worker=all`, so a multi-host slice (e.g. v5litepod-16, four
hosts) gets the same code, the same install and the same command on every
host: the plain CLI, `python -m kforcing_jax SUBCOMMAND ...`. On a multi-host
slice (more than 8 chips or cores) `all` adds `--env
KFORCING_DISTRIBUTED=auto` unless it is given (`=off` keeps the hosts
apart; `run` on its own passes only what it is given): the CLI then calls
`jax.distributed.initialize()`, which finds the coordinator on Cloud TPU,
and process 0 alone writes the result files.

Subcommands:
  create   create the TPU VM slice
  copy     copy this repository to every worker (~/kforcing_jax)
  install  pip install the copied package and its deps on every worker
  run      start a kforcing_jax command on every worker (nohup, background),
           on none if any worker still runs it or lacks the install
  logs     follow a run's log on worker 0 (or --worker=N / all)
  stop     stop a run on every worker
  delete   delete the TPU VM slice
  all      create + copy + install + run

Examples:
  python launch/tpu_pod.py all --name=kf-pod --zone=us-central1-a \\
      --accelerator-type=v5litepod-16 --spot --env KFORCING_DISTRIBUTED=auto \\
      -- train-teacher --config=configs/demo.py --workdir=/mnt/shared/kf
  python launch/tpu_pod.py logs --name=kf-pod --zone=us-central1-a \\
      --run-name=train-teacher
  python launch/tpu_pod.py stop --name=kf-pod --zone=us-central1-a \\
      --run-name=train-teacher
  python launch/tpu_pod.py delete --name=kf-pod --zone=us-central1-a

`--dry-run` prints every command (one per line, shell-quoted) and runs
nothing. Otherwise the commands run in order and the first failure stops the
helper with the failing command and its exit status (exit code 1). Bad
arguments exit with code 2.
"""

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Optional, Sequence

# Repository root: the directory above launch/.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The kforcing_jax CLI subcommands (kept here so this helper does not import
# jax on the machine that launches the pod; a test checks them against
# kforcing_jax.cli.SUBCOMMANDS).
KFORCING_SUBCOMMANDS = ('pipeline', 'train-teacher', 'distill', 'generate',
                        'train-evaluator', 'evaluate', 'bench', 'report')
# The kforcing_jax CLI's flags (kforcing_jax/cli.py; a test keeps the two
# in step), to say where one given before `--` belongs.
_KFORCING_FLAGS = frozenset(
    '--' + name for name in (
        'config', 'workdir', 'prompt', 'k', 'model', 'max_new_tokens',
        'temperature', 'greedy', 'nogreedy', 'readout', 'frequency_penalty',
        'seed'))

# TPU software (runtime) version for each accelerator family, following the
# Cloud TPU "TPU software versions" guide for JAX. Override with --version.
DEFAULT_RUNTIME = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',  # v5e
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',  # Trillium
}

# Accelerator types look like FAMILY-SIZE: v4-32, v5litepod-16, v6e-8, ...
_ACCELERATOR_RE = re.compile(r'^(v\d+[a-z]*)-(\d+)$')
# TPU node names: lowercase letters, digits and hyphens, starting with a letter.
_NAME_RE = re.compile(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
_RUN_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
_ENV_KEY_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')

# Remote layout, relative to each worker's $HOME. These strings are expanded
# by the worker's shell, so they stay unquoted "$HOME/..." inside scripts.
REMOTE_VENV = '$HOME/kforcing_venv'
REMOTE_LOGS = '$HOME/kforcing_logs'

# Not copied to the workers: VCS data, local runs, caches, build outputs.
COPY_EXCLUDES = ('.git', '.venv', 'venv', 'workdirs', '__pycache__',
                 '*.egg-info', '.pytest_cache', '.hypothesis', '.benchmarks',
                 '.ipynb_checkpoints', 'build', 'dist')


@dataclasses.dataclass
class Step:
  """One thing to do: a command to run, or a local Python action.

  Attributes:
    argv: The command (run without a shell), or None for a local action.
    action: A local action (e.g. staging files), used when argv is None.
    comment: What a local action does; printed as `# comment` on --dry-run.
  """
  argv: Optional[list[str]] = None
  action: Optional[Callable[[], None]] = None
  comment: str = ''

  def describe(self) -> str:
    if self.argv is not None:
      return shlex.join(self.argv)
    return f'# {self.comment}'


# ---------------------------------------------------------------- gcloud verbs


def _gcloud(verb: str, args) -> tuple[list[str], list[str]]:
  """(`gcloud compute tpus tpu-vm VERB`, the flags every verb shares)."""
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb]
  tail = [f'--zone={args.zone}']
  if args.project:
    tail.append(f'--project={args.project}')
  return cmd, tail


def _remote_dir(args) -> str:
  return f'$HOME/{args.remote_dir}'


def _ssh(args, script: str, worker: str = 'all') -> list[str]:
  """Runs a shell `script` on the given worker(s) over gcloud ssh.

  The script runs in the worker's login shell (bash on TPU VM images). It
  uses double quotes where it can, so the printed command stays readable.
  """
  cmd, tail = _gcloud('ssh', args)
  return cmd + [args.name, f'--worker={worker}'] + tail + [
      f'--command={script}']


def _dq(text: str) -> str:
  """`text` double-quoted for a POSIX shell ($HOME etc. stay literal)."""
  for char in '\\"$`':
    text = text.replace(char, '\\' + char)
  return f'"{text}"'


def create_steps(args) -> list[Step]:
  cmd, tail = _gcloud('create', args)
  argv = cmd + [args.name] + tail + [
      f'--accelerator-type={args.accelerator_type}',
      f'--version={args.version}']
  if args.spot:
    argv.append('--spot')
  if args.preemptible:
    argv.append('--preemptible')
  return [Step(argv=argv)]


def _stage_dir(args) -> str:
  """Local staging folder; its basename is the remote folder name."""
  user = getattr(os, 'getuid', lambda: 0)()
  return os.path.join(tempfile.gettempdir(), f'kforcing_pod_stage_{user}',
                      args.remote_dir)


def _stage(source: str, dest: str, excludes: Sequence[str]) -> None:
  """Copies `source` to a fresh `dest`, leaving out `excludes` patterns."""
  if os.path.exists(dest):
    shutil.rmtree(dest)
  shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*excludes),
                  symlinks=True)


def copy_steps(args) -> list[Step]:
  """Stages a clean copy of the repo, then scp's it to every worker."""
  stage = _stage_dir(args)
  excludes = COPY_EXCLUDES + tuple(args.exclude)
  cmd, tail = _gcloud('scp', args)
  return [
      Step(action=lambda: _stage(args.source, stage, excludes),
           comment=f'stage {args.source} in {stage} without '
           f'{", ".join(excludes)}'),
      # scp -r of a folder into the home directory lands in ~/<basename>,
      # overwriting the files of an earlier copy.
      Step(argv=cmd + ['--recurse', '--worker=all'] + tail +
           [stage, f'{args.name}:']),
  ]


def _shell_word(text: str) -> str:
  """`text` as one shell word: as is when safe, else double-quoted."""
  return text if shlex.quote(text) == text else _dq(text)


def install_script(args) -> str:
  """Shell run on every worker: a Python >= 3.11 venv with the package."""
  pip = f'"{REMOTE_VENV}/bin/python" -m pip'
  packages = ' '.join(_dq(p) for p in [f'.[{args.extras}]'] +
                      (args.pip_package or ['jax[tpu]']))
  return '; '.join([
      'set -eu',
      f'cd "{_remote_dir(args)}"',
      # The package needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10.
      'PY=python3',
      'if ! python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"; '
      'then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive '
      'apt-get install -y -qq python3.11 python3.11-venv; PY=python3.11; fi',
      f'[ -x "{REMOTE_VENV}/bin/python" ] || "$PY" -m venv "{REMOTE_VENV}"',
      f'{pip} install -q --upgrade pip',
      f'{pip} install -q -e {packages}',
      # Import check only: touching the TPU here would wait for every host.
      f'"{REMOTE_VENV}/bin/python" -c "import jax, kforcing_jax; '
      'print(jax.__version__)"',
  ])


def install_steps(args) -> list[Step]:
  return [Step(argv=_ssh(args, install_script(args)))]


def _alive(pid: str) -> str:
  """Shell test: process `pid` (a shell word) runs kforcing_jax. A pid
  file outlives its process, and the pid may since name another one."""
  return (f'kill -0 {pid} 2>/dev/null && '
          f'grep -q kforcing_jax /proc/{pid}/cmdline 2>/dev/null')


def _start_checks(args) -> list[str]:
  """Bash lines that refuse to start the run on this worker: a copy of it
  still going there, or no venv."""
  logs, run = REMOTE_LOGS, args.run_name
  running = _alive(f'"$(cat "{logs}/{run}.pid")"')
  return [
      'set -eu',
      f'if [ -f "{logs}/{run}.pid" ] && {running}; then echo "run {run} is '
      f'already running on $(hostname); stop it first" >&2; exit 1; fi',
      f'if [ ! -x "{REMOTE_VENV}/bin/python" ]; then echo "no '
      f'{REMOTE_VENV} on $(hostname): run install first" >&2; exit 1; fi',
  ]


def check_script(args) -> str:
  """Bash run on every worker before any starts: the start checks alone.
  A worker that refuses then stops the run everywhere (gcloud's ssh to
  --worker=all fails if any worker's command does), rather than the others
  starting and waiting for it in their first collective."""
  return '; '.join(_start_checks(args) + [
      f'echo "{args.run_name} can start on $(hostname)"'])


def run_script(args) -> str:
  """Bash run on every worker: start the command detached, save its pid.
  It checks again: a worker may have changed since `check_script`."""
  logs = REMOTE_LOGS
  run = args.run_name
  env = ' '.join(_shell_word(kv) for kv in args.env)
  command = ' '.join(_shell_word(a) for a in ['-m', 'kforcing_jax'] +
                     args.kforcing_args)
  return '; '.join(_start_checks(args) + [
      f'mkdir -p "{logs}"',
      f'cd "{_remote_dir(args)}"',
      # Appended, not overwritten: a restart after a stop or a preemption
      # keeps the earlier segments' "saved step N" lines and errors.
      f'echo "=== $(date -u +%FT%TZ) start on $(hostname)" >> '
      f'"{logs}/{run}.log"',
      # nohup + redirected stdio: the run outlives this ssh session.
      f'nohup {"env " + env + " " if env else ""}"{REMOTE_VENV}/bin/python" '
      f'{command} >> "{logs}/{run}.log" 2>&1 < /dev/null & '
      f'echo $! > "{logs}/{run}.pid"',
      f'echo "started {run} on $(hostname): pid $(cat "{logs}/{run}.pid"), '
      f'log {logs}/{run}.log"',
  ])


def run_steps(args) -> list[Step]:
  return [Step(argv=_ssh(args, check_script(args))),
          Step(argv=_ssh(args, run_script(args)))]


def logs_steps(args) -> list[Step]:
  log = f'{REMOTE_LOGS}/{args.run_name}.log'
  follow = '-F ' if args.follow else ''
  script = f'tail -n {args.lines} {follow}"{log}"'
  return [Step(argv=_ssh(args, script, worker=args.worker))]


def stop_steps(args) -> list[Step]:
  """Signals the run, then waits up to --wait seconds for it to exit.

  On SIGTERM a multi-host run saves only at its next train.log_every step,
  so returning at once invited a `delete` that lost that save; a run still
  alive after the wait makes the step fail (exit 1).
  """
  run = args.run_name
  pid_file = f'{REMOTE_LOGS}/{run}.pid'
  running, pid_alive = _alive(f'"$(cat "{pid_file}")"'), _alive('"$pid"')
  wait = (
      f'i=0; while {pid_alive} && [ $i -lt {args.wait} ]; '
      'do sleep 1; i=$((i + 1)); done; '
      f'if {pid_alive}; then echo "{run} is still running on '
      f'$(hostname) after {args.wait}s (it saves at its next log_every '
      f'step): see its log, stop again, or --signal=KILL" >&2; exit 1; fi; '
      f'echo "{run} exited on $(hostname)"; ') if args.wait else ''
  script = (
      f'if [ -f "{pid_file}" ] && {running}; then '
      f'pid="$(cat "{pid_file}")"; kill -{args.signal} "$pid"; '
      f'echo "sent SIG{args.signal} to {run} on $(hostname)"; {wait}'
      f'else echo "{run} is not running on $(hostname)"; fi')
  return [Step(argv=_ssh(args, script))]


def delete_steps(args) -> list[Step]:
  cmd, tail = _gcloud('delete', args)
  # gcloud asks for confirmation unless --quiet (our --yes).
  return [Step(argv=cmd + [args.name] + tail + (['--quiet'] if args.yes
                                                 else []))]


def all_steps(args) -> list[Step]:
  return (create_steps(args) + copy_steps(args) + install_steps(args) +
          run_steps(args))


STEPS = {
    'create': create_steps,
    'copy': copy_steps,
    'install': install_steps,
    'run': run_steps,
    'logs': logs_steps,
    'stop': stop_steps,
    'delete': delete_steps,
    'all': all_steps,
}

# ---------------------------------------------------------------- arguments


def _parser() -> tuple[argparse.ArgumentParser,
                       dict[str, argparse.ArgumentParser]]:
  """The top-level parser and the parser of each subcommand."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True,
                      help='TPU VM name (lowercase letters, digits, hyphens).')
  common.add_argument('--zone', required=True, help='e.g. us-central1-a.')
  common.add_argument('--project', default='',
                      help='Google Cloud project (default: gcloud config).')
  common.add_argument('--dry-run', action='store_true',
                      help='Print the commands, one per line; run nothing.')

  def accelerator(p):
    p.add_argument('--accelerator-type', required=True,
                   help='e.g. v4-32, v5litepod-16, v5p-8, v6e-16.')
    p.add_argument('--version', default='',
                   help='TPU software version (default: the JAX runtime of '
                   'the accelerator family, e.g. v2-alpha-tpuv5-lite).')
    kind = p.add_mutually_exclusive_group()
    kind.add_argument('--spot', action='store_true', help='Spot VMs.')
    kind.add_argument('--preemptible', action='store_true',
                      help='Preemptible VMs.')

  def remote(p):
    p.add_argument('--remote-dir', default='kforcing_jax',
                   help='Folder under each worker\'s $HOME holding the code.')

  def copy(p):
    p.add_argument('--source', default=REPO_ROOT,
                   help='Local repository to copy (default: this one).')
    p.add_argument('--exclude', action='append', default=[],
                   metavar='PATTERN', help='Extra file pattern not to copy.')

  def install(p):
    p.add_argument('--extras', default='demo',
                   help='Package extras to install (default: demo).')
    p.add_argument('--pip-package', action='append', default=None,
                   metavar='SPEC', help="Pip requirement installed beside "
                   "the package, repeatable (default: 'jax[tpu]', which "
                   "brings libtpu; given ones replace it).")

  def run_name(p):
    p.add_argument('--run-name', default='',
                   help='Log/pid name (default: the kforcing_jax '
                   'subcommand, e.g. train-teacher).')

  def named_run(p):  # logs and stop: no subcommand to default to.
    p.add_argument('--run-name', default='',
                   help='Required: the name given to `run` (its --run-name, '
                   'else its kforcing_jax subcommand, e.g. train-teacher).')

  def run(p):
    run_name(p)
    p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                   help='Environment variable for the run (repeatable).')
    p.add_argument('kforcing_args', nargs=argparse.REMAINDER,
                   help='After --: the kforcing_jax command, e.g. '
                   'train-teacher --config=configs/demo.py --workdir=W')

  parser = argparse.ArgumentParser(
      prog='tpu_pod.py', description=__doc__.split('\n\n')[0],
      epilog='Run `tpu_pod.py SUBCOMMAND --help` for its flags.',
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='subcommand', required=True,
                              metavar='SUBCOMMAND')

  subparsers = {}

  def add(name, help_text, *extras):
    p = sub.add_parser(name, parents=[common], help=help_text,
                       description=help_text)
    subparsers[name] = p
    for extra in extras:
      extra(p)
    return p

  add('create', 'Create the TPU VM slice.', accelerator)
  add('copy', 'Copy this repository to every worker.', remote, copy)
  add('install', 'pip install the copied package on every worker.', remote,
      install)
  add('run', 'Start a kforcing_jax command on every worker.', remote, run)
  logs = add('logs', "Show (follow) a run's log.", named_run)
  logs.add_argument('--worker', default='0',
                    help='Worker index, or all (default: 0).')
  logs.add_argument('--lines', type=int, default=100,
                    help='Lines of history to show first.')
  logs.add_argument('--no-follow', dest='follow', action='store_false',
                    help='Print and exit instead of following.')
  stop = add('stop', 'Stop a run on every worker.', named_run)
  # No INT: `run` starts the job in the background, where SIGINT is
  # ignored (kforcing_jax keeps it so).
  stop.add_argument('--signal', default='TERM', choices=('TERM', 'KILL'),
                    help='TERM (default): save a checkpoint at the next step '
                    'and exit; KILL: stop at once, without saving.')
  stop.add_argument('--wait', type=int, default=600, metavar='SECONDS',
                    help='Wait this long for the run to exit (a multi-host '
                    'run saves at its next train.log_every step); fail if '
                    'it is still running. 0: return at once.')
  delete = add('delete', 'Delete the TPU VM slice.')
  delete.add_argument('--yes', action='store_true',
                      help='Do not ask for confirmation (gcloud --quiet).')
  add('all', 'create + copy + install + run.', accelerator, remote, copy,
      install, run)
  return parser, subparsers


def _note_multi_host(args: argparse.Namespace, workdirs: Sequence[str]):
  """On a slice of more than 8 chips or cores, which has several hosts:
  joins them (KFORCING_DISTRIBUTED=auto, unless given; without it each
  host would run alone and write the result files) and warns (stderr) of
  a workdir local to each host, which the CLI learns of only on the
  workers, after create, copy and install."""
  if int(_ACCELERATOR_RE.match(args.accelerator_type).group(2)) <= 8:
    return
  keys = {kv.split('=', 1)[0] for kv in args.env}
  if 'KFORCING_DISTRIBUTED' not in keys:
    args.env.append('KFORCING_DISTRIBUTED=auto')
    print(f'NOTE: {args.accelerator_type} has several hosts: added --env '
          'KFORCING_DISTRIBUTED=auto so that they join one JAX run (--env '
          'KFORCING_DISTRIBUTED=off keeps them apart)', file=sys.stderr)
  for value in workdirs:
    if not value.startswith('/'):  # ~ is each host's own home.
      print(f'NOTE: --workdir={value} is relative: each host would write its '
            f'own ~/{args.remote_dir}/{value}, and a multi-host run needs one '
            'folder every host sees (an NFS or gcsfuse mount); the CLI '
            'refuses it on the workers', file=sys.stderr)


def _flag_values(args: Sequence[str], flag: str) -> list[str]:
  """The values given to `flag` in `args`, as `flag=V` or `flag V` ('' for
  a bare flag at the end)."""
  return [a.split('=', 1)[1] if a != flag else
          args[i + 1] if i + 1 < len(args) else ''
          for i, a in enumerate(args)
          if a == flag or a.startswith(flag + '=')]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses and checks `argv`; bad input exits with code 2 via parser.error."""
  parser, subparsers = _parser()
  args, unknown = parser.parse_known_args(argv)
  error = subparsers[args.subcommand].error  # Usage of the subcommand.
  if unknown:
    # kforcing_jax's own flags given before `--`: argparse only said
    # "unrecognized arguments".
    theirs = [a for a in unknown
              if a.split('=', 1)[0].split('.', 1)[0] in _KFORCING_FLAGS]
    if theirs and hasattr(args, 'kforcing_args'):
      error(f'{theirs[0]} is a kforcing_jax flag: put it after `--` and the '
            'subcommand, e.g. `-- train-teacher --config=configs/demo.py '
            '--workdir=W`')
    error(f'unrecognized arguments: {" ".join(unknown)}')

  if not _NAME_RE.match(args.name):
    error(f'--name={args.name!r}: use lowercase letters, digits and hyphens, '
          'starting with a letter (at most 63 characters)')
  if not re.match(r'^[a-z]+-[a-z]+\d+-[a-z]$', args.zone):
    error(f'--zone={args.zone!r} does not look like a zone, e.g. '
          'us-central1-a')

  if hasattr(args, 'accelerator_type'):
    match = _ACCELERATOR_RE.match(args.accelerator_type)
    if not match:
      error(f'--accelerator-type={args.accelerator_type!r} is not of the form '
            'FAMILY-SIZE, e.g. v4-32, v5litepod-16, v5p-8, v6e-16')
    family = match.group(1)
    if family == 'v5e':  # The product name, not the accelerator type's.
      error(f'--accelerator-type={args.accelerator_type!r}: Cloud TPU names '
            f'v5e slices v5litepod-N, e.g. v5litepod-{match.group(2)}')
    if not args.version:
      if family not in DEFAULT_RUNTIME:
        error(f'no default --version for accelerator family {family!r} '
              f'(known: {", ".join(sorted(DEFAULT_RUNTIME))}); pass '
              '--version explicitly')
      args.version = DEFAULT_RUNTIME[family]

  if hasattr(args, 'remote_dir') and not _RUN_NAME_RE.match(args.remote_dir):
    error(f'--remote-dir={args.remote_dir!r}: use a plain folder name')
  if hasattr(args, 'source') and not os.path.isdir(args.source):
    error(f'--source={args.source!r} is not a directory')

  if hasattr(args, 'kforcing_args'):
    rest = list(args.kforcing_args)
    if rest and rest[0] == '--':
      rest = rest[1:]
    if not rest or rest[0] not in KFORCING_SUBCOMMANDS:
      got = rest[0] if rest else '(nothing)'
      error(f'expected a kforcing_jax command after the flags, e.g. '
            f'`-- train-teacher --config=configs/demo.py --workdir=W`; got '
            f'{got!r} (subcommands: {", ".join(KFORCING_SUBCOMMANDS)})')
    workdirs = _flag_values(rest, '--workdir')
    if not workdirs:
      error(f'the kforcing_jax command needs --workdir=W: {shlex.join(rest)}')
    if not all(workdirs):
      error('--workdir needs a value, e.g. --workdir=/mnt/shared/kf')
    for value in _flag_values(rest, '--config'):
      # The workers run from the copy of --source; ml_collections allows
      # a PATH:ARG suffix.
      path = value.split(':', 1)[0]
      if (hasattr(args, 'source') and not os.path.isabs(path) and
          not os.path.isfile(os.path.join(args.source, path))):
        error(f'--config={value}: no {path} under --source={args.source}, '
              'which is what the workers get')
    # Refused by the CLI too, but only on the workers, after create, copy
    # and install ran.
    for value in workdirs:
      if '://' in value:
        error(f'--workdir={value} is a URL; mount the bucket on every worker '
              '(e.g. gcsfuse) and pass the mount path')
      if '$' in value:  # The command is quoted: no shell would expand it.
        error(f'--workdir={value}: the workers get it as written, $ '
              'included; give the path itself (e.g. /mnt/shared/kf)')
    for kv in args.env:
      if '=' not in kv or not _ENV_KEY_RE.match(kv.split('=', 1)[0]):
        error(f'--env={kv!r}: expected KEY=VALUE')
      if '$' in kv:
        error(f'--env={kv!r}: the workers get the value as written, $ '
              'included; give it in full')
      key, value = kv.split('=', 1)
      if key == 'KFORCING_DISTRIBUTED' and value not in ('auto', 'off'):
        error(f'--env={kv!r}: expected KFORCING_DISTRIBUTED=auto or off')
    # After `--` everything goes to kforcing_jax, which would refuse e.g.
    # --dry-run only on the workers, after create, copy and install ran.
    own = {s for a in subparsers[args.subcommand]._actions  # pylint: disable=protected-access
           for s in a.option_strings} - {'-h', '--help'}
    for a in rest:
      if a.split('=', 1)[0] in own:
        error(f'{a} comes after `--`, so it would go to kforcing_jax; put '
              "this helper's flags before `--`")
    args.kforcing_args = rest
    if hasattr(args, 'accelerator_type'):
      _note_multi_host(args, workdirs)

  if hasattr(args, 'run_name'):
    if not args.run_name:
      rest = getattr(args, 'kforcing_args', None)
      if rest:
        args.run_name = rest[0]
      else:
        error('--run-name is required (the name given to `run`, by default '
              'its kforcing_jax subcommand, e.g. train-teacher)')
    if not _RUN_NAME_RE.match(args.run_name):
      error(f'--run-name={args.run_name!r}: use letters, digits, ., _ and -')

  if hasattr(args, 'worker') and args.worker != 'all' and (
      not args.worker.isdigit()):
    error(f'--worker={args.worker!r}: expected a worker index or all')
  if hasattr(args, 'lines') and args.lines < 0:
    error(f'--lines={args.lines} must be >= 0')
  if hasattr(args, 'wait') and args.wait < 0:
    error(f'--wait={args.wait} must be >= 0 (0: do not wait)')
  return args


# ---------------------------------------------------------------- execution


def execute(steps: Sequence[Step]) -> int:
  """Runs the steps in order; returns 0, or 1 at the first failure."""
  if any(s.argv is not None for s in steps) and not shutil.which('gcloud'):
    print('error: gcloud not found on PATH; install the Google Cloud CLI '
          '(or use --dry-run to see the commands)', file=sys.stderr)
    return 1
  for i, step in enumerate(steps, 1):
    print(f'[{i}/{len(steps)}] {step.describe()}', file=sys.stderr, flush=True)
    if step.argv is None:
      try:
        step.action()
      except OSError as e:
        print(f'error: step {i}/{len(steps)} failed: {step.comment}: {e}',
              file=sys.stderr)
        return 1
      continue
    rc = subprocess.run(step.argv, check=False).returncode
    if rc != 0:
      print(f'error: step {i}/{len(steps)} failed with exit status {rc}: '
            f'{step.describe()}\n(later steps were not run)', file=sys.stderr)
      return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  steps = STEPS[args.subcommand](args)
  if args.dry_run:
    for step in steps:
      print(step.describe())
    return 0
  try:
    return execute(steps)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
