"""The independent evaluator: a Hugging Face `transformers` causal LM loaded
from a local folder (`eval.evaluator`), scoring our samples' text after
re-tokenising it with its own tokenizer, as the paper does with GPT-2 Large.
torch and transformers come with the `eval` extra."""

import os
from typing import Sequence

import numpy as np

from kforcing_jax import eval_settings

EVAL_EXTRA_HINT = ("pip install 'kforcing_jax[eval]'  (or: pip install torch "
                   'transformers)')


def import_transformers(purpose: str = 'eval.evaluator is set'):
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{purpose}, which needs the optional packages `torch` '
        f'and `transformers` (the `eval` extra): {EVAL_EXTRA_HINT}. '
        f'Import failed: {e}') from e
  return torch, transformers


def continuation_start(prefix_ids: Sequence[int],
                       full_ids: Sequence[int]) -> int:
  """Index of the first scored evaluator token: after the common prefix.

  Re-tokenising the full text may merge the prefix's last token with the
  continuation, so the boundary is the longest common token prefix; at least
  1, since the first token has no context.
  """
  i = 0
  while i < min(len(prefix_ids), len(full_ids)) and (
      prefix_ids[i] == full_ids[i]):
    i += 1
  return max(i, 1)


class HFEvaluator:
  """A causal LM from `transformers`, loaded from a local directory."""

  def __init__(self, path: str, batch_size: int = 8):
    eval_settings.check_evaluator_dir(path)
    torch, transformers = import_transformers()
    self._torch = torch
    self.path = path
    self.batch_size = batch_size
    self.tokenizer = _load_tokenizer(transformers, path)
    # float32 whatever the saved dtype: perplexities must not depend on it.
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True).float().to(self.device)
    self.model.eval()
    mc = self.model.config
    self.max_len = (getattr(mc, 'n_positions', None) or
                    getattr(mc, 'max_position_embeddings', None) or 1 << 30)
    self._lead = _leading_special_ids(self.tokenizer)

  @property
  def document_separator(self) -> str:
    """What stands for our eos in the text it scores: its own eos token
    (GPT-2's <|endoftext|>), as between documents in its training data."""
    return self.tokenizer.eos_token or '\n\n'

  def _ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids after the special tokens its tokenizer puts in
    front (a BOS), but without any it appends: a sample is cut at seq_len,
    not a finished document, so an appended eos would be scored as if the
    text ended there."""
    return [self._lead + list(
        self.tokenizer(t, add_special_tokens=False)['input_ids'])
            for t in texts]

  def token_spans(self, prefix_texts, texts):
    """(ids, start, cut) per sample: evaluator ids truncated to its
    context, the first scored index, and how many ids the truncation cut."""
    out = []
    for p_ids, ids in zip(self._ids(prefix_texts), self._ids(texts)):
      cut = max(len(ids) - self.max_len, 0)
      ids = ids[:self.max_len]
      out.append((ids, min(continuation_start(p_ids, ids), len(ids)), cut))
    return out

  def nll(self, prefix_texts: Sequence[str], texts: Sequence[str]):
    """(nll_sum (N,), count (N,), cut (N,)) of each text's continuation
    tokens; cut: its tokens past the evaluator's context, not scored."""
    spans = self.token_spans(prefix_texts, texts)
    sums = np.zeros(len(spans))
    counts = np.zeros(len(spans), np.int64)
    cuts = np.asarray([cut for _, _, cut in spans], np.int64)
    for lo in range(0, len(spans), self.batch_size):
      chunk = spans[lo:lo + self.batch_size]
      lp = self._logprobs([ids for ids, _, _ in chunk])
      for j, (ids, start, _) in enumerate(chunk):
        # lp[j, i] scores ids[i + 1]; scored tokens are ids[start:].
        sums[lo + j] = -lp[j, start - 1:len(ids) - 1].sum()
        counts[lo + j] = max(len(ids) - start, 0)
    return sums, counts, cuts

  def _logprobs(self, rows: list[list[int]]) -> np.ndarray:
    """(B, maxlen - 1) next-token log-probs of right-padded rows."""
    torch = self._torch
    width = max(2, max(len(r) for r in rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
      mask[i, :len(r)] = 1
    ids, mask = ids.to(self.device), mask.to(self.device)
    with torch.no_grad():
      logits = self.model(input_ids=ids, attention_mask=mask).logits
      lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
      out = torch.gather(lp, 2, ids[:, 1:, None])[..., 0]
    return out.double().cpu().numpy()


def _leading_special_ids(tokenizer) -> list[int]:
  """The ids a tokenizer puts before a text's own (a BOS, or none)."""
  probe = 'a b'
  full = list(tokenizer(probe)['input_ids'])
  plain = list(tokenizer(probe, add_special_tokens=False)['input_ids'])
  for i in range(len(full) - len(plain) + 1):
    if full[i:i + len(plain)] == plain:
      return full[:i]
  # The probe tokenised differently with specials: keep a leading BOS.
  bos = getattr(tokenizer, 'bos_token_id', None)
  return [bos] if bos is not None and full[:1] == [bos] else []


def evaluator_text(tokenizer, ids, separator: str) -> str:
  """`ids` decoded for the evaluator: the tokenizer drops eos, which would
  glue two documents into one run-on text (with byte-level BPE even their
  words), so each eos becomes `separator` between decoded pieces."""
  pieces, piece = [], []
  for t in np.asarray(ids).tolist():
    if t == tokenizer.eos_id:
      pieces.append(piece)
      piece = []
    else:
      piece.append(t)
  pieces.append(piece)
  return separator.join(tokenizer.decode(p) for p in pieces)


# Any text: a tokenizer that makes no tokens of it is none at all.
_PROBE_TEXT = 'The evaluator scores this sentence.'


def _load_tokenizer(transformers, path: str):
  """The folder's tokenizer, or a ValueError naming eval.evaluator: a folder
  without tokenizer files failed with the loader's own words, or (with
  transformers 5) loaded a tokenizer that makes no tokens, so every
  evaluator perplexity came out n/a without a word."""
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # Each tokenizer class fails its own way (OSError, ValueError, ...).
    raise ValueError(f'eval.evaluator={path!r}: its tokenizer does not load '
                     f'({type(e).__name__}: {e})') from e
  if not tokenizer(_PROBE_TEXT, add_special_tokens=False)['input_ids']:
    raise ValueError(f'eval.evaluator={path!r}: its tokenizer makes no '
                     'tokens of text; does the folder hold the tokenizer '
                     'files (save_pretrained of the tokenizer too)?')
  return tokenizer


def check_evaluator(path: str) -> None:
  """What a pipeline checks before it trains: the folder holds model
  weights, its tokenizer loads and makes tokens, and its model config loads
  (the weights themselves are loaded by evaluate only: they can be large).
  Needs the `eval` extra."""
  eval_settings.check_evaluator_dir(path)
  if not any(name.endswith(('.safetensors', '.bin', '.safetensors.index.json',
                            '.bin.index.json'))
             for name in os.listdir(path)):
    raise ValueError(f'eval.evaluator={path!r} has no model weights '
                     '(model.safetensors or pytorch_model.bin)')
  _, transformers = import_transformers()
  _load_tokenizer(transformers, path)
  try:
    transformers.AutoConfig.from_pretrained(path, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'eval.evaluator={path!r}: its config.json does not '
                     f'load ({type(e).__name__}: {e})') from e


def load_evaluator(s: eval_settings.EvalSettings) -> HFEvaluator | None:
  return HFEvaluator(s.evaluator, s.evaluator_batch_size) if s.evaluator else (
      None)
