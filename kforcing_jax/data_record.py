"""Which data a workdir was made from, recorded in `{workdir}/data.json`.

Its tokenizer (when trained here) and its models were made from that data.
Without a record, a later command with other data settings, or run after
the corpus files changed, went on silently: a tokenizer trained on another
corpus was reused (half the tokens unk), `distill` or `evaluate` run
without the teacher's data flags used the demo corpus, and a file added
under `data.text_glob` moved held-out files into training (the split rule
goes by file position). What identifies the data: the source, the train
split, `data.max_documents`, and for 'text' each matched file's name
relative to their common folder and its size (so a corpus moved or copied
elsewhere still matches); for 'tfds' the dataset name and text feature.
"""

import json
import os
import sys
from typing import Any

from kforcing_jax import documents
from kforcing_jax import files

RECORD = 'data.json'


def identity(config) -> dict[str, Any]:
  """What the record compares (module doc)."""
  d = config.data
  out = {'source': documents.check_source(config),
         'train_split': d.train_split, 'max_documents': int(d.max_documents)}
  if out['source'] == 'text':
    paths = documents.text_paths(d.text_glob)
    root = (os.path.commonpath(paths) if len(paths) > 1
            else os.path.dirname(paths[0]))
    out['files'] = [[os.path.relpath(p, root), os.path.getsize(p)]
                    for p in paths]
  elif out['source'] == 'tfds':
    out.update(tfds_name=d.tfds_name, text_feature=d.text_feature)
  return out


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """What changed between two identities, one phrase each."""
  out = []
  for key in sorted(set(then) | set(now)):
    if key == 'files' or then.get(key) == now.get(key):
      continue
    out.append(f'data.{key} was {then.get(key)!r}, now {now.get(key)!r}')
  if 'files' in then and 'files' in now and then['files'] != now['files']:
    old, new = dict(map(tuple, then['files'])), dict(map(tuple, now['files']))
    old = _rebased(old, new)
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    resized = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    parts = [f'{len(names)} {what} (e.g. {names[0]!r})'
             for names, what in ((added, 'added'), (removed, 'removed'),
                                 (resized, 'changed size')) if names]
    out.append('the files data.text_glob matches: ' + ', '.join(parts))
  return out


def _rebased(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
  """`old`'s names as `new` spells them. Names are relative to the files'
  common folder, which moves when a file is added or removed in another
  folder: every name would then count as removed and added."""
  by_base = {}
  for name in new:
    by_base.setdefault(os.path.basename(name), []).append(name)
  best, hits, tried = old, len(set(old) & set(new)), set()
  for o in old:
    for n in by_base.get(os.path.basename(o), ()):
      if n.endswith(os.sep + o):  # The folder moved up: prefix old names.
        move = ('up', n[:-len(o)])
      elif o.endswith(os.sep + n):  # Down: strip the prefix.
        move = ('down', o[:-len(n)])
      else:
        continue
      if move in tried:
        continue
      tried.add(move)
      way, prefix = move
      moved = {(prefix + name if way == 'up' else name.removeprefix(prefix)):
               size for name, size in old.items()}
      if len(set(moved) & set(new)) > hits:
        best, hits = moved, len(set(moved) & set(new))
  return best


def check(config, workdir: str) -> dict[str, Any]:
  """Refuses data other than what the workdir was made from; returns this
  run's identity, for `write` once the run's tokenizer is settled."""
  now = identity(config)
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return now
  with open(path, encoding='utf-8') as f:
    then = json.load(f)
  changed = differences(then, now)
  if changed:
    files_note = (' The held-out split goes by file position, so changed '
                  'files move documents between train and held-out.'
                  if changed[-1].startswith('the files') else '')
    raise ValueError(
        f'{workdir} was made from other data: {"; ".join(changed)}. Its '
        f'tokenizer and models were made from the recorded data.{files_note}'
        ' Give the same data settings (every command of a workdir needs its '
        '--config.data.* flags), or use another --workdir; to go on with '
        'changed data on purpose (keeping the tokenizer and the trained '
        f'models), delete {path}.')
  return now


def write(now: dict[str, Any], workdir: str) -> None:
  """Records `now` if the workdir has no record (process 0 only). Called
  by the teacher's run, which defines the workdir: another command first
  on a workdir (an old one without a record) only checks, so a command run
  with the wrong flags cannot record them."""
  path = os.path.join(workdir, RECORD)
  if os.path.exists(path):
    return
  # Imported here, where it is needed: sharding imports jax.
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  if not sharding.is_main_process():
    return
  try:
    files.atomic_write_text(path, json.dumps(now, indent=1) + '\n')
  except OSError as e:  # A read-only workdir still decodes.
    print(f'[data] NOTE: could not record the data in {path} '
          f'({e.strerror}); it is not checked on later runs',
          file=sys.stderr)
