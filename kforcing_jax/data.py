"""Corpora as deterministic, resumable token batches, and the run's tokenizer.

Every source (`documents.py`) becomes one stream of token sequences built by
"concat then chunk": each document's tokens are followed by `eos`, documents
are concatenated, and the stream is cut into non-overlapping windows of
exactly `model.seq_len` tokens (a ragged tail is dropped).

For 'sotu' and 'text' a split is tokenized once and its chunk array cached in
`{workdir}/data_cache/`; training shuffles whole chunks. For 'tfds' documents
are shuffled and tokenized lazily with grain, then packed on the fly.

Training streams are infinite: epoch e visits every example once in an order
that depends only on (`data.shuffle_seed`, e). Each step takes the next B
positions of the global stream (B = `train.batch_size`: step t of a run that
kept one B reads [t * B, (t + 1) * B)), and process p of P keeps rows
[p * B / P, (p + 1) * B / P) of them, so the processes' batches of one step
are disjoint and together equal the single-process batch. The iterator state
is global (the same on every process) and JSON-serialisable; it holds the
stream position, in sequences, so a run resumed with another B reads on
where it stopped.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
import copy
import functools
import hashlib
import os
import re
import sys
from typing import Any

import grain
import numpy as np

from kforcing_jax import data_record
from kforcing_jax import documents
from kforcing_jax import files
from kforcing_jax import tokenizer as tokenizer_lib

# Bump when the chunk cache format or tokenization recipe changes.
# 2: a tokenizers JSON encodes special-token text as text (it made an eos).
_CACHE_VERSION = 2
_STATE_VERSION = 1
# Lazy tfds reads: a few threads, a modest read-ahead (2-core machines too).
_TFDS_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)


# --------------------------------------------------------------------------
# The run's tokenizer.
# --------------------------------------------------------------------------


def training_splits(config, held_out) -> list[tuple[str, str]]:
  """The (setting, split) pairs a training run reads: the train split, and
  the eval split when its held-out evals are on (`held_out`: e.g. a
  train.eval_every > 0)."""
  splits = [('data.train_split', config.data.train_split)]
  if held_out:
    splits.append(('data.eval_split', config.data.eval_split))
  return splits


def training_text_notes(config,
                        named_splits: Sequence[tuple[str, str]]) -> list[str]:
  """A note for each held-out setting in `named_splits` that names the
  training split itself: its losses and prefixes are then training text,
  and nothing else would say so. Exact names only (a tfds slice such as
  'train[99%:]' is taken as the user's choice)."""
  return [f'{name}={split!r} is data.train_split: its numbers are measured '
          'on training text, not held out'
          for name, split in named_splits
          if name != 'data.train_split' and split == config.data.train_split]


# What commands write at a workdir's top level (files and folders).
_WORKDIR_OUTPUTS = frozenset((
    'tokenizer.model', 'tokenizer.sha256', 'data.json', 'data_cache',
    'teacher', 'evaluator', 'samples', 'profile', 'eval.json', 'bench.json',
    'bench.png', 'report.md', 'pipeline.json'))


def _check_workdir_outside_corpus(config, workdir: str) -> None:
  """Refuses a data.text_glob that matches files the run writes: they
  would be read as documents, and the next command refused the workdir
  as made from other data, naming no cause."""
  if config.data.source != 'text' or not os.path.isdir(workdir):
    return
  root = os.path.abspath(workdir)
  for path in documents.text_paths(config.data.text_glob):
    rel = os.path.relpath(os.path.abspath(path), root)
    top = rel.split(os.sep)[0]
    # Only what the run writes: a corpus folder may sit inside the workdir.
    if top in _WORKDIR_OUTPUTS or re.fullmatch(r'student_k\d+', top):
      raise ValueError(
          f'data.text_glob={config.data.text_glob!r} matches files under '
          f'--workdir={workdir} (e.g. {path!r}), which would be read as '
          'documents: put the workdir outside the corpus folder or narrow '
          'the glob')


def get_tokenizer(config, workdir: str, *, check_data: bool = True,
                  splits: Sequence[tuple[str, str]] | None = None,
                  record_data: bool = False) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: `data.tokenizer_path`, or SentencePiece trained once.

  Without `data.tokenizer_path`, a SentencePiece model with
  `model.vocab_size` pieces is trained on the train split and cached at
  `{workdir}/tokenizer.model` (reused as is when present).

  With `check_data` (every command that reads data; not `generate`, which
  only encodes prompts): the `splits` the run reads ((setting, split)
  pairs; default the train split) must have documents, and the data must
  be what the workdir was made from (`data_record`), both checked before
  a tokenizer is trained. `record_data`: record this run's data if the
  workdir has no record (the teacher's run, which defines the workdir).

  Raises:
    ValueError: The tokenizer's vocabulary exceeds `model.vocab_size`, a
      split is empty, or the workdir was made from other data.
  """
  documents.check_source(config)
  identity, notes = None, []
  if check_data:
    _check_workdir_outside_corpus(config, workdir)
    if splits is None:
      splits = training_splits(config, held_out=False)
    documents.check_splits(config, splits)
    identity = data_record.check(config, workdir)
    notes = training_text_notes(config, splits)
  path = config.data.tokenizer_path
  if path:
    tokenizer = tokenizer_lib.load_tokenizer(path)
  else:
    path = os.path.join(workdir, 'tokenizer.model')
    if os.path.exists(path):
      tokenizer = tokenizer_lib.load_tokenizer(path)
      _note_reused_tokenizer(path, tokenizer, config.model.vocab_size)
    else:
      tokenizer_lib.check_before_training(workdir, path)
      # Said aloud (on stderr: generate's stdout is JSON): a paper config
      # run without its tokenizer file gets another vocabulary than the
      # paper's, and training one takes time.
      # Imported here, where it is needed: sharding imports jax.
      from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
      sharding.print_once(
          f'[data] no data.tokenizer_path: training a SentencePiece '
          f'tokenizer ({config.model.vocab_size} pieces) on the '
          f'{config.data.train_split!r} split into {path}',
          file=sys.stderr, flush=True)
      texts = documents.raw_texts(config, config.data.train_split)
      tokenizer = tokenizer_lib.train_sentencepiece(
          texts, config.model.vocab_size, path)
      if tokenizer.vocab_size < config.model.vocab_size:
        sharding.print_once(
            f'[data] the tokenizer has {tokenizer.vocab_size} pieces, '
            f'fewer than model.vocab_size={config.model.vocab_size}: the '
            'corpus is too small for more, so ids from '
            f'{tokenizer.vocab_size} up are never used (a smaller '
            'model.vocab_size saves their parameters)',
            file=sys.stderr, flush=True)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f'Tokenizer {path!r} has vocab_size {tokenizer.vocab_size} > '
        f'model.vocab_size {config.model.vocab_size}; raise model.vocab_size '
        'to at least the tokenizer size.')
  tokenizer_lib.check_workdir_tokenizer(tokenizer, workdir)
  if identity is not None and record_data:
    data_record.write(identity, workdir)
  if check_data:  # Again, now that the workdir has files of its own.
    _check_workdir_outside_corpus(config, workdir)
  if notes:
    from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
    for note in notes:
      sharding.print_once(f'[data] NOTE: {note}', file=sys.stderr, flush=True)
  return tokenizer


# --------------------------------------------------------------------------
# TFDS records as token arrays.
# --------------------------------------------------------------------------


# (path, vocab_size) pairs already noted: a pipeline loads the tokenizer
# in every stage.
_NOTED_REUSE = set()


def _note_reused_tokenizer(path: str, tokenizer: tokenizer_lib.Tokenizer,
                           vocab_size: int) -> None:
  """The workdir's tokenizer is reused as it is: said (once per process)
  when it was trained for another model.vocab_size. A raised one would
  otherwise leave the new ids unused without a word; one below the
  tokenizer's pieces is refused just after."""
  trained_for = tokenizer.trained_vocab_size()  # From the loaded model.
  if (trained_for is None or trained_for == vocab_size
      or (path, vocab_size) in _NOTED_REUSE):
    return
  _NOTED_REUSE.add((path, vocab_size))
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  if sharding.is_main_process():
    unused = (f'; ids from {tokenizer.vocab_size} up are never used'
              if tokenizer.vocab_size < vocab_size else '')
    print(f'[data] NOTE: reusing {path}, trained for vocab_size='
          f'{trained_for} ({tokenizer.vocab_size} pieces), though '
          f'model.vocab_size={vocab_size}{unused}. To train one for '
          f'{vocab_size}, use a new workdir (this one\'s runs are tied to '
          'its tokenizer)', file=sys.stderr, flush=True)


def _record_tokens(record, *, tokenizer: tokenizer_lib.Tokenizer,
                   feature: str) -> np.ndarray:
  ids = tokenizer.encode(documents.record_text(record, feature))
  ids.append(tokenizer.eos_id)
  return np.asarray(ids, dtype=np.int32)


def _tfds_documents(config, split: str) -> grain.MapDataset:
  """Records of `split` (first `data.max_documents` if set), not tokenized."""
  ds = grain.MapDataset.source(documents.tfds_source(config, split))
  if config.data.max_documents > 0:
    ds = ds[:config.data.max_documents]
  return ds


def _tokenize_fn(config, tokenizer: tokenizer_lib.Tokenizer):
  return functools.partial(_record_tokens, tokenizer=tokenizer,
                           feature=config.data.text_feature)


# --------------------------------------------------------------------------
# Concat then chunk.
# --------------------------------------------------------------------------


def concat_then_chunk(token_lists: Iterable[Sequence[int]], eos_id: int,
                      seq_len: int) -> np.ndarray:
  """(n, seq_len) int32: documents + eos, concatenated, cut, tail dropped."""
  pieces = []
  for ids in token_lists:
    pieces.append(np.asarray(ids, dtype=np.int32))
    pieces.append(np.asarray([eos_id], dtype=np.int32))
  stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  n = len(stream) // seq_len
  return stream[:n * seq_len].reshape(n, seq_len)


def _cache_key(tokenizer: tokenizer_lib.Tokenizer, docs: Sequence[str],
               seq_len: int) -> str:
  h = hashlib.sha256()
  h.update(f'v{_CACHE_VERSION}|{tokenizer.fingerprint}|{seq_len}|'.encode())
  for doc in docs:
    raw = doc.encode('utf-8')
    h.update(len(raw).to_bytes(8, 'little'))
    h.update(raw)
  return h.hexdigest()[:16]


def _split_chunks(config, tokenizer: tokenizer_lib.Tokenizer,
                  workdir: str | None, split: str) -> np.ndarray:
  """Chunk array of a sotu/text split, cached in `{workdir}/data_cache`.

  The cache key hashes the tokenizer file, seq_len and the documents' text,
  so any change to the corpus, split rule or tokenizer gets a new file.
  """
  seq_len = config.model.seq_len
  docs = documents.load_documents(config, split)
  if not docs:
    raise ValueError(
        f'Split {split!r} of data.source={config.data.source!r} has no '
        'documents.')
  path = None
  if workdir:
    safe_split = re.sub(r'[^A-Za-z0-9_.-]', '_', split)
    name = f'{safe_split}_{seq_len}_{_cache_key(tokenizer, docs, seq_len)}.npy'
    path = os.path.join(workdir, 'data_cache', name)
    if os.path.exists(path):
      return np.load(path, mmap_mode='r')
  chunks = concat_then_chunk(tokenizer.encode_batch(docs), tokenizer.eos_id,
                             seq_len)
  if path:
    files.atomic_write(path, lambda f: np.save(f, chunks))
  return chunks


class _PackedChunker:
  """Concat-then-chunk over an iterator of token arrays (each ends in eos).

  Its state is (state of the document iterator before the first document
  still pending, tokens of it already emitted), so it restores exactly and
  stays small: no tokens are stored in it.
  """

  def __init__(self, docs: grain.IterDataset, seq_len: int):
    self._docs = docs.__iter__()
    self._seq_len = seq_len
    self._pending = collections.deque()  # [doc_state, tokens, start] lists.
    self._pending_len = 0

  def next_chunk(self) -> np.ndarray:
    """The next seq_len tokens; StopIteration when a finite stream ends."""
    while self._pending_len < self._seq_len:
      state = copy.deepcopy(self._docs.get_state())
      tokens = next(self._docs)
      self._pending.append([state, tokens, 0])
      self._pending_len += len(tokens)
    out = np.empty(self._seq_len, dtype=np.int32)
    filled = 0
    while filled < self._seq_len:
      entry = self._pending[0]
      _, tokens, start = entry
      n = min(self._seq_len - filled, len(tokens) - start)
      out[filled:filled + n] = tokens[start:start + n]
      filled += n
      if start + n == len(tokens):
        self._pending.popleft()
      else:
        entry[2] = start + n
    self._pending_len -= self._seq_len
    return out

  def get_state(self) -> dict[str, Any]:
    if self._pending:
      doc_state, _, start = self._pending[0]
      return {'docs': copy.deepcopy(doc_state), 'offset': int(start)}
    return {'docs': copy.deepcopy(self._docs.get_state()), 'offset': 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._docs.set_state(copy.deepcopy(state['docs']))
    self._pending.clear()
    self._pending_len = 0
    offset = int(state['offset'])
    if offset:
      doc_state = copy.deepcopy(self._docs.get_state())
      tokens = next(self._docs)
      self._pending.append([doc_state, tokens, offset])
      self._pending_len = len(tokens) - offset


# --------------------------------------------------------------------------
# Training streams and iterator.
# --------------------------------------------------------------------------


def grain_seed(shuffle_seed: int) -> int:
  """The seed handed to grain for `data.shuffle_seed`.

  grain seeds epoch e's shuffle with seed + e, so seeds s and s + 1 would
  read the same order one epoch apart. An odd multiplier mod 2**31 spreads
  the seeds apart (and keeps them distinct); 0 stays 0, the default's order.
  """
  return shuffle_seed * 0x9E3779B1 % 2**31


class _ChunkArrayStream:
  """Infinite stream over a fixed chunk array, reshuffled every epoch.

  Position k is chunk perm_e[k % n] with e = k // n (grain's index shuffle
  seeded by `seed` + e), so rows are fetched by position and a process
  reads only its own rows.
  """

  kind = 'chunks'

  def __init__(self, chunks: np.ndarray, seed: int):
    self._ds = grain.MapDataset.source(chunks).shuffle(seed=seed).repeat()
    self._position = 0

  def take(self, n: int, lo: int, hi: int) -> np.ndarray:
    """Consumes n positions, returns rows [lo, hi) of them."""
    rows = [self._ds[self._position + i] for i in range(lo, hi)]
    self._position += n
    return np.stack(rows).astype(np.int32, copy=False)

  def get_state(self) -> dict[str, Any]:
    return {'position': self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    self._position = int(state['position'])


class _PackedStream:
  """Infinite stream packed from lazily tokenized, shuffled documents.

  Every process packs the whole global stream (tokenizing B * seq_len tokens
  per step) and keeps its rows: packing depends on all preceding documents.
  """

  kind = 'packed'

  def __init__(self, docs: grain.IterDataset, seq_len: int):
    self._chunker = _PackedChunker(docs, seq_len)

  def take(self, n: int, lo: int, hi: int) -> np.ndarray:
    chunks = [self._chunker.next_chunk() for _ in range(n)]
    return np.stack(chunks[lo:hi])

  def get_state(self) -> dict[str, Any]:
    return self._chunker.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._chunker.set_state(state)


class TokenIterator:
  """Infinite iterator of int32 (per_process_batch, seq_len) token batches.

  `get_state()` is JSON-serialisable and global: the state saved by any
  process restores every process of the same run.
  """

  def __init__(self, stream, *, global_batch_size: int, seq_len: int,
               process_index: int = 0, process_count: int = 1):
    self.per_process_batch = _per_process_batch(global_batch_size,
                                                process_count)
    if not 0 <= process_index < process_count:
      raise ValueError(
          f'process_index {process_index} is outside [0, {process_count}).')
    self._stream = stream
    self.global_batch_size = global_batch_size
    self.seq_len = seq_len
    self._lo = process_index * self.per_process_batch
    self._hi = self._lo + self.per_process_batch
    self._step = 0

  def __iter__(self) -> TokenIterator:
    return self

  def __next__(self) -> np.ndarray:
    batch = self._stream.take(self.global_batch_size, self._lo, self._hi)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """Position of the next batch, as plain JSON types."""
    return {
        'version': _STATE_VERSION,
        'kind': self._stream.kind,
        'global_batch_size': self.global_batch_size,
        'seq_len': self.seq_len,
        'step': self._step,
        'stream': self._stream.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores `get_state()` output; the next batches repeat exactly.

    A state saved at another global batch size resumes at the same
    sequence of the stream (its position counts sequences, not batches),
    so a run resumed with a new train.batch_size reads on where it stopped.
    """
    expected = {'version': _STATE_VERSION, 'kind': self._stream.kind,
                'seq_len': self.seq_len}
    for key, value in expected.items():
      if state.get(key) != value:
        raise ValueError(
            f'Data iterator state has {key}={state.get(key)!r} but this '
            f'iterator has {key}={value!r}; it cannot be resumed from it.')
    self._stream.set_state(state['stream'])
    self._step = int(state['step'])


class LazyIterator:
  """A training iterator made on first use, by `make()`.

  For a finished run: it restores its iterator's state but never draws a
  batch, so it need not read its data (nor say how much there is, as a
  skipped stage of a resumed pipeline did). A state set before the
  iterator is made is applied, and checked, when it is.
  """

  def __init__(self, make: Callable[[], TokenIterator]):
    self._make = make
    self._iterator = None
    self._state = None

  def _get(self) -> TokenIterator:
    if self._iterator is None:
      self._iterator = self._make()
      if self._state is not None:
        self._iterator.set_state(self._state)
    return self._iterator

  def __iter__(self) -> LazyIterator:
    return self

  def __next__(self) -> np.ndarray:
    return next(self._get())

  def get_state(self) -> dict[str, Any]:
    return self._get().get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    if self._iterator is None:
      self._state = state
    else:
      self._iterator.set_state(state)


def _per_process_batch(batch_size: int, process_count: int) -> int:
  if process_count < 1 or batch_size < 1 or batch_size % process_count:
    raise ValueError(
        f'train.batch_size {batch_size} is not divisible by process_count '
        f'{process_count}.')
  return batch_size // process_count


def _check_seq_len(config) -> int:
  seq_len = config.model.seq_len
  if seq_len < 1:
    raise ValueError(f'model.seq_len must be positive, got {seq_len}.')
  return seq_len


def _note_unknown_tokens(tokenizer: tokenizer_lib.Tokenizer, split: str,
                         chunks: np.ndarray) -> None:
  """Notes a train split that is more than 1% unknown tokens: a tokenizer
  made for other text (data.tokenizer_path), which nothing said."""
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  if tokenizer.unk_id is None or not sharding.is_main_process():
    return
  share = float(np.mean(chunks == tokenizer.unk_id))
  if share > 0.01:
    print(f'[data] NOTE: {share:.1%} of the {split!r} split\'s tokens are '
          f'the unknown token (id {tokenizer.unk_id}) of {tokenizer.path}: '
          'it does not cover this text, and the model learns nothing of '
          'what those tokens stand for', file=sys.stderr, flush=True)


def _say_train_size(split: str, sequences: int, seq_len: int,
                    batch_size: int) -> None:
  """How much the run trains on, which nothing said: a tiny corpus made
  batches that repeat the same few sequences, without a word."""
  # Imported here, where it is needed: sharding imports jax.
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  if not sharding.is_main_process():
    return
  note = (f'; NOTE: fewer than one batch of {batch_size}, so every batch '
          'repeats them' if sequences < batch_size else
          f', {sequences / batch_size:.1f} batches of {batch_size} per epoch')
  print(f'[data] train split {split!r}: {sequences} sequences of {seq_len} '
        f'tokens ({sequences * seq_len:,} tokens){note}', file=sys.stderr,
        flush=True)


def make_train_iterator(config, tokenizer: tokenizer_lib.Tokenizer,
                        workdir: str, *, process_index: int = 0,
                        process_count: int = 1) -> TokenIterator:
  """The infinite, sharded, resumable training iterator of the train split.

  Args:
    config: Experiment config (data.*, model.seq_len, train.batch_size).
    tokenizer: From `get_tokenizer`.
    workdir: Run directory; sotu/text chunk caches go to its data_cache/.
    process_index: This process's index (jax.process_index()).
    process_count: Number of processes (jax.process_count()).

  Returns:
    A TokenIterator of (train.batch_size // process_count, seq_len) batches.
  """
  source = documents.check_source(config)
  batch_size = config.train.batch_size
  _per_process_batch(batch_size, process_count)
  seq_len = _check_seq_len(config)
  seed = grain_seed(config.data.shuffle_seed)
  if source == 'tfds':
    docs = _tfds_documents(config, config.data.train_split)
    docs = docs.shuffle(seed=seed).repeat().map(_tokenize_fn(config,
                                                             tokenizer))
    stream = _PackedStream(docs.to_iter_dataset(_TFDS_READ_OPTIONS), seq_len)
  else:
    split = config.data.train_split
    chunks = _split_chunks(config, tokenizer, workdir, split)
    if len(chunks) == 0:  # pylint: disable=g-explicit-length-test
      raise ValueError(f'Train split {split!r} is shorter than one window of '
                       f'seq_len {seq_len} tokens.')
    _say_train_size(split, len(chunks), seq_len, batch_size)
    _note_unknown_tokens(tokenizer, split, chunks)
    stream = _ChunkArrayStream(chunks, seed)
  return TokenIterator(stream, global_batch_size=batch_size, seq_len=seq_len,
                       process_index=process_index,
                       process_count=process_count)


def make_eval_batches(config, tokenizer: tokenizer_lib.Tokenizer,
                      workdir: str, *, batch_size: int, num_batches: int,
                      split: str | None = None) -> list[np.ndarray]:
  """The first `num_batches` full batches of a held-out split, in order.

  Deterministic and unshuffled: the split's documents in their stored order,
  concatenated and chunked. Returns fewer batches when the split is short.

  Args:
    config: Experiment config.
    tokenizer: From `get_tokenizer`.
    workdir: Run directory (sotu/text chunk cache).
    batch_size: Sequences per batch.
    num_batches: Wanted number of batches.
    split: Split name; defaults to `data.eval_split`.

  Returns:
    A list of int32 (batch_size, seq_len) arrays.

  Raises:
    ValueError: The split has fewer than `batch_size` sequences.
  """
  source = documents.check_source(config)
  seq_len = _check_seq_len(config)
  split = split or config.data.eval_split
  if batch_size < 1 or num_batches < 1:
    raise ValueError(f'batch_size {batch_size} and num_batches {num_batches} '
                     'must be positive.')
  wanted = batch_size * num_batches
  if source == 'tfds':
    docs = _tfds_documents(config, split)
    docs = docs.map(_tokenize_fn(config, tokenizer))
    chunker = _PackedChunker(docs.to_iter_dataset(_TFDS_READ_OPTIONS), seq_len)
    rows = []
    try:
      while len(rows) < wanted:
        rows.append(chunker.next_chunk())
    except StopIteration:
      pass
    chunks = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
  else:
    chunks = _split_chunks(config, tokenizer, workdir, split)[:wanted]
  n = len(chunks) // batch_size
  if n == 0:
    raise ValueError(
        f'Eval split {split!r} has {len(chunks)} sequences of seq_len '
        f'{seq_len}, fewer than batch_size {batch_size}.')
  return [np.array(chunks[i * batch_size:(i + 1) * batch_size], np.int32)
          for i in range(n)]
