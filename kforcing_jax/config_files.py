"""Reading --config files from a command line, for one-line errors.

Used by the CLI and `python -m kforcing_jax.aot` before absl parses the
flags, so a missing file, an error inside it or a misspelled
--config.x.y override is one line instead of a traceback. Defines no flags.
"""

import importlib.machinery
import importlib.util
import os
import re
import sys


def _config_flags(argv):
  """(index, words) of each --config in `argv`: `--config=F` is one word,
  `--config F` two."""
  found = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      found.append((i, 1))
    elif arg == '--config' and i + 1 < len(argv):
      found.append((i, 2))
  return found


def _config_flag(argv):
  """The --config absl keeps (the last given), or None without one."""
  found = _config_flags(argv)
  return found[-1] if found else None


def config_path(argv):
  """The --config file named in `argv`, or None."""
  found = _config_flag(argv)
  if found is None:
    return None
  i, words = found
  return argv[i].split('=', 1)[1] if words == 1 else argv[i + 1]


def split_argument(path):
  """(file, args) of ml_collections' `file.py:argument` form: as
  ml_collections does, the text after the first ':' is passed to
  get_config."""
  file, *argument = path.split(':', 1)
  return file, tuple(argument)


def load_config(path):
  """Runs a config file and returns its get_config(), called with the
  argument of a `file.py:argument` path, as ml_collections loads it: any
  file name (not only *.py), the module in sys.modules while it runs (a
  dataclass in it looks its module up there)."""
  path, args = split_argument(path)
  name = '_kforcing_user_config'
  loader = importlib.machinery.SourceFileLoader(name, path)
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_loader(name, loader))
  sys.modules[name] = module
  try:
    loader.exec_module(module)
    return module.get_config(*args)
  finally:
    del sys.modules[name]


def file_error(e: Exception) -> str:
  """One line for an exception raised while loading a config file."""
  text = str(e)
  unknown = re.search(r'Key "(\w+)" does not exist', text)
  if unknown:  # The locked base config refused a new (misspelled) field.
    hint = re.search(r'Did you mean "(\w+)"', text)
    return (f'unknown config field {unknown.group(1)!r}' +
            (f' (did you mean {hint.group(1)!r}?)' if hint else '') +
            '; see kforcing_jax/defaults.py for every field')
  return f'{type(e).__name__}: {text}'


def check_file(argv) -> str | None:
  """Loads --config once; returns a one-line error, or None if it loads."""
  path = config_path(argv)
  if path is None:
    return None
  file, argument = split_argument(path)
  if not os.path.isfile(file):
    if os.path.isdir(file):
      return f'--config={path} is a directory; name a config file in it'
    if argument:
      return (f'--config={path}: no such file {file} (the text after the '
              "first ':' is get_config's argument)")
    return f'--config={path}: no such file'
  try:
    config = load_config(path)
  except Exception as e:  # pylint: disable=broad-except
    return f'--config={path}: {file_error(e)}'
  # Checked by name: importing ml_collections here is not worth it.
  if type(config).__name__ not in ('ConfigDict', 'FrozenConfigDict'):
    return (f'--config={path}: get_config() returned a '
            f'{type(config).__name__}; return a ConfigDict (start from '
            'kforcing_jax.defaults.base_config())')
  return None


def unknown_fields(argv) -> list[str]:
  """--config.a.b overrides whose field does not exist in the config file."""
  path = config_path(argv)
  if not path or not os.path.isfile(split_argument(path)[0]):
    return []
  config = load_config(path)
  unknown = []
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    field = arg[len('--config.'):].split('=', 1)[0]
    node = config
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        unknown.append(field)
        break
      node = node[part]
  return unknown


def config_first(argv):
  """`argv` with --config moved ahead of its --config.x.y overrides:
  ml_collections refuses an override given before the file it overrides,
  though the order means nothing to the result."""
  found = _config_flags(argv)
  if not found:
    return argv
  i, words = found[-1]  # absl keeps the last; the others are dropped.
  spans = {j for k, w in found for j in range(k, k + w)}
  return argv[:1] + argv[i:i + words] + [
      a for j, a in enumerate(argv) if j and j not in spans]


def last_override_wins(argv):
  """`argv` with only the last `--config.a.b=...` of each field: absl
  keeps the last value of a repeated scalar but joins a repeated tuple's
  values (`--config.bench.ks=(4,)` then `=(2,)` gave (4, 2)), so a field
  repeated to override a base command line now always means the last."""
  last = {}
  for i, arg in enumerate(argv):
    if arg.startswith('--config.') and '=' in arg:
      last[arg.split('=', 1)[0]] = i
  return [arg for i, arg in enumerate(argv)
          if not (arg.startswith('--config.') and '=' in arg)
          or last[arg.split('=', 1)[0]] == i]


class FlagsError(Exception):
  """A command line that cannot be parsed; str() is the one-line reason."""


def parse_flags(flag_values, argv, unknown_hint: str = ''):
  """`flag_values(argv)` (absl's parse; returns the other arguments), with
  the config file loaded first: a bad file or a misspelled --config.x.y
  override raises FlagsError with one line (`unknown_hint` follows the
  unknown fields). absl's own errors (an unknown flag, an override value
  of the wrong type) pass through as flags.Error, for the caller's usage
  text.
  """
  reordered = last_override_wins(config_first(argv))
  if argv is sys.argv:  # ml_collections reads its overrides from sys.argv.
    sys.argv[:] = reordered
  argv = reordered
  error = check_file(argv)
  if error:
    raise FlagsError(error)
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as e:
    unknown = unknown_fields(argv)
    if unknown:
      raise FlagsError(f'unknown config field(s): {", ".join(unknown)}'
                       f'{unknown_hint}') from e
    raise FlagsError(f'bad flag: {e}') from e
