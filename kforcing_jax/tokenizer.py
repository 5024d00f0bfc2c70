"""Tokenizers: SentencePiece `.model` or `tokenizers` `.json` files, loaded as
one `Tokenizer`; offline SentencePiece training; and the record of which
tokenizer a workdir's models were trained with."""

from collections.abc import Iterable, Sequence
import hashlib
import io
import os
import sys

import numpy as np

from kforcing_jax import files

# Special tokens looked up (in this order) in a tokenizers JSON file.
_EOS_CANDIDATES = ('[SEP]', '<|endoftext|>', '</s>', '<eos>', '<|eos|>')
_PAD_CANDIDATES = ('[PAD]', '<pad>', '<|pad|>', '<|padding|>')
_UNK_CANDIDATES = ('[UNK]', '<unk>', '<|unk|>')

# Byte fallback costs 256 pieces, so only vocabularies this large get it.
_MIN_VOCAB_FOR_BYTE_FALLBACK = 1024


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


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
    self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts)

  def decode(self, ids: list[int]) -> str:
    # Control pieces (pad, eos) decode to nothing.
    return self._sp.decode(ids)

  def trained_vocab_size(self) -> int | None:
    """The vocab_size it was trained for (its trainer spec; it may hold
    fewer pieces), or None if the spec cannot be read."""
    try:
      # pylint: disable=g-import-not-at-top
      from sentencepiece import sentencepiece_model_pb2
      proto = sentencepiece_model_pb2.ModelProto()
      proto.ParseFromString(self._sp.serialized_model_proto())
      return int(proto.trainer_spec.vocab_size) or None
    except Exception:  # pylint: disable=broad-except  # Only for a note.
      return None


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
    # Text that spells a special token ('<|endoftext|>' in a document) is
    # text: matched as the token, it put a document break (eos) mid-document.
    self._tok.encode_special_tokens = True
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
    self.unk_id = _first_present(vocab, _UNK_CANDIDATES)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    # eos is appended by the data pipeline; no [CLS]/[SEP] templates here.
    encodings = self._tok.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def trained_vocab_size(self) -> None:
    return None  # A tokenizers JSON keeps no requested size.


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
    unk_id: The unknown token's id, or None (byte-level: none needed).
    path: The file the tokenizer was loaded from ('' if built in memory).
    fingerprint: sha256 of the tokenizer file; keys the token caches.
  """

  def __init__(self, backend, *, path: str, fingerprint: str):
    self._backend = backend
    self.vocab_size: int = int(backend.vocab_size)
    self.eos_id: int = int(backend.eos_id)
    self.pad_id: int = int(backend.pad_id)
    self.unk_id: int | None = backend.unk_id
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

  def trained_vocab_size(self) -> int | None:
    """The vocab_size a SentencePiece model was trained for (it may hold
    fewer pieces: `vocab_size`), or None where that is not recorded."""
    return self._backend.trained_vocab_size()

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


# SentencePiece's max_sentence_length, in bytes.
_MAX_SENTENCE_BYTES = 1 << 16


def _fitting_pieces(line: str) -> list[str]:
  """`line` cut into pieces SentencePiece trains on: it silently skips a
  sentence longer than _MAX_SENTENCE_BYTES, which left the text of
  one-line documents out of the vocabulary (all unk). Cuts at a space
  where there is one; a character is at most 4 bytes."""
  if len(line.encode('utf-8')) <= _MAX_SENTENCE_BYTES:
    return [line]
  limit, pieces = _MAX_SENTENCE_BYTES // 4, []
  while len(line) > limit:
    # After the space: a piece starting with one would learn '▁▁word'.
    cut = line.rfind(' ', 0, limit - 1) + 1 or limit
    pieces.append(line[:cut])
    line = line[cut:]
  return pieces + [line]


def _training_sentences(texts: Iterable[str]) -> list[str]:
  """Non-blank lines: SentencePiece trains on sentences, not documents."""
  return [piece for text in texts for line in text.split('\n')
          if line.strip() for piece in _fitting_pieces(line)
          if piece.strip()]


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
        max_sentence_length=_MAX_SENTENCE_BYTES,
        minloglevel=2)
  except RuntimeError as e:
    raise ValueError(
        f'SentencePiece training for {model_path!r} with vocab_size='
        f'{vocab_size} failed: {e}') from e
  proto = writer.getvalue()
  files.atomic_write(model_path, lambda f: f.write(proto))
  return load_tokenizer(model_path)


# Which tokenizer a workdir's models were trained with (sha256 of its file).
TOKENIZER_RECORD = 'tokenizer.sha256'


def check_workdir_tokenizer(tokenizer: Tokenizer, workdir: str) -> None:
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
    recorded = _read_record(record)
    if recorded:
      _refuse_another(tokenizer, workdir, recorded[0],
                      recorded[1] or 'another file', record)
    return
  trained = os.path.join(workdir, 'tokenizer.model')
  if os.path.isfile(trained) and (os.path.abspath(tokenizer.path) !=
                                  os.path.abspath(trained)):
    _refuse_another(tokenizer, workdir,
                    hashlib.sha256(_read_bytes(trained)).hexdigest(), trained,
                    record)
  # Imported here, where it is needed: sharding imports jax.
  from kforcing_jax import sharding  # pylint: disable=g-import-not-at-top
  if sharding.is_main_process():
    try:
      files.atomic_write_text(
          record,
          f'{tokenizer.fingerprint} {os.path.abspath(tokenizer.path)}\n')
    except OSError as e:  # A read-only workdir still decodes.
      print(f'[data] NOTE: could not record the tokenizer in {record} '
            f'({e.strerror}); it is not checked on later runs',
            file=sys.stderr)


def _read_record(record: str) -> list[str]:
  """[sha256, path] from a tokenizer record ('' for a missing path), or
  [] for an empty one."""
  with open(record, encoding='utf-8') as f:
    recorded = f.read().strip().split(maxsplit=1)
  return recorded + [''] * (len(recorded) == 1)


def check_before_training(workdir: str, model_path: str) -> None:
  """Refuses to train a tokenizer into `model_path` (which does not exist
  yet) when the workdir's models were made with another file (e.g. a run
  without the data.tokenizer_path its workdir was made with):
  `check_workdir_tokenizer` would refuse the result anyway, after the time
  training took."""
  record = os.path.join(workdir, TOKENIZER_RECORD)
  if not os.path.exists(record):
    return
  recorded = _read_record(record)
  first = recorded[1] if recorded else ''
  # Only a file that is there, so another than `model_path`: a record with
  # a relative path (a relative --workdir) or of a moved workdir may not
  # resolve from here; training then goes on and the fingerprint check
  # decides.
  if os.path.isfile(first):
    raise ValueError(
        f'{workdir} was made with the tokenizer {first} (sha256 '
        f'{recorded[0][:12]}...), and its models read that one\'s ids; '
        f'without data.tokenizer_path this run would train another into '
        f'{model_path}. Set data.tokenizer_path={first} or use another '
        f'--workdir (or delete {record} if you are sure).')


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
