"""The `bench` config section: `BenchSettings`, read and checked up front."""

import dataclasses

from kforcing_jax import decode
from kforcing_jax import projection
from kforcing_jax import roofline


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """The `bench` config section; every field has a default."""
  batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
  ks: tuple[int, ...] = (2, 3, 4)  # Student k values; k=1 (AR) always runs.
  prefix_len: int = 6  # Prompt tokens; decoded up to model.seq_len.
  max_new_tokens: int = 0  # 0: model.seq_len - prefix_len.
  repeats: int = 5  # Timed runs per cell; the median is reported.
  warmup: int = 1  # Untimed runs after compiling (at least one is made).
  peer: bool = True  # Time a Hugging Face GPT-2 if torch is importable.
  random_weights: bool = False  # Ignore trained runs in the workdir.
  prompts: str = 'random'  # 'random' ids or 'heldout' eval-split prefixes.
  roofline: str = 'max'  # Which prediction is "predicted": roofline.MODES.
  matmul_size: int = 2048  # n of the n^3 matmul that measures peak FLOP/s.
  copy_mib: int = 256  # Array size of the bandwidth measurement.
  peak_flops: float = 0.0  # FLOP/s; 0 measures it.
  bandwidth: float = 0.0  # Bytes/s; 0 measures it.
  seed: int = 0  # Prompts, noise and random weights.
  key_layout: str = 'auto'  # KV-cache key layout: decode.DecodeSpec.
  attention_impl: str = 'auto'  # Cached attention: decode.DecodeSpec.
  # 'argmax': a greedy AR teacher and argmax students; 'sample' or
  # 'median': the teacher samples by inverse CDF and the students read out
  # that way (decode.DecodeSpec.readout), all at temperature 1.
  readout: str = 'argmax'
  # One more run of every cell under the profiler: ops per step, kept
  # traces under WORKDIR/profile (step_profile.py).
  profile: bool = False
  # Vocabulary projection of the decode loop: set from `kernels.impl`, not
  # from the bench section (projection.py).
  kernel_impl: str = 'auto'


def settings_from_config(config) -> BenchSettings:
  """Reads `config.bench` (absent fields take defaults); raises ValueError."""
  section = config.get('bench', None) or {}
  names = {f.name for f in dataclasses.fields(BenchSettings)} - {
      'kernel_impl'}
  unknown = sorted(set(section.keys()) - names)
  if unknown:
    raise ValueError(f'unknown bench field(s) {unknown}; known: '
                     f'{sorted(names)}')
  values = {}
  for f in dataclasses.fields(BenchSettings):
    if f.name in section:
      value = section[f.name]
      if f.name in ('batch_sizes', 'ks'):
        if isinstance(value, (str, bytes)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
          raise ValueError(f'bench.{f.name}={value!r}: need a tuple of ints, '
                           f"e.g. '--config.bench.{f.name}=(1,8)'")
        value = tuple(value)
      values[f.name] = value
  values['kernel_impl'] = str(
      (config.get('kernels', None) or {}).get('impl', 'auto'))
  projection.check_impl(values['kernel_impl'])
  s = BenchSettings(**values)
  check_settings(s, config.model.seq_len)
  check_attention(s, config.model.d_model, config.model.num_heads,
                  "the config's model")
  return s


def check_settings(s: BenchSettings, seq_len: int) -> None:
  """Raises ValueError naming the first bad field of `s` for seq_len."""
  if not s.batch_sizes or min(s.batch_sizes) < 1:
    raise ValueError(f'bench.batch_sizes={s.batch_sizes}: need positive ints')
  if not s.ks or any(k < 2 for k in s.ks):
    raise ValueError(f'bench.ks={s.ks}: need student k values >= 2 (k=1 is '
                     'the AR teacher, always timed)')
  # A repeat was timed twice and its speedups divided by the other run's
  # AR time (one AR time per batch size is kept).
  for name, values in (('batch_sizes', s.batch_sizes), ('ks', s.ks)):
    if len(set(values)) != len(values):
      raise ValueError(f'bench.{name}={values}: each value once')
  if s.prefix_len < 1:
    raise ValueError(f'bench.prefix_len={s.prefix_len} must be >= 1')
  if s.max_new_tokens < 0:
    raise ValueError(f'bench.max_new_tokens={s.max_new_tokens} must be >= 0 '
                     '(0: up to model.seq_len)')
  if new_tokens(s, seq_len) < 1:
    raise ValueError(f'bench.prefix_len={s.prefix_len} leaves no room to '
                     f'decode within model.seq_len={seq_len}')
  if s.prefix_len + new_tokens(s, seq_len) > seq_len:
    raise ValueError(f'bench.prefix_len + max_new_tokens = '
                     f'{s.prefix_len + s.max_new_tokens} > model.seq_len='
                     f'{seq_len}')
  for name in ('matmul_size', 'copy_mib'):
    if getattr(s, name) < 1:
      raise ValueError(f'bench.{name}={getattr(s, name)} must be >= 1')
  for name in ('peak_flops', 'bandwidth'):
    if not getattr(s, name) >= 0:
      raise ValueError(f'bench.{name}={getattr(s, name)} must be >= 0 '
                       '(0: measure it)')
  if s.repeats < 1 or s.warmup < 0:
    raise ValueError(f'bench.repeats={s.repeats} must be >= 1 and '
                     f'bench.warmup={s.warmup} >= 0')
  if s.prompts not in ('random', 'heldout'):
    raise ValueError(f"bench.prompts={s.prompts!r}; expected 'random' or "
                     "'heldout'")
  if s.roofline not in roofline.MODES:
    raise ValueError(f'bench.roofline={s.roofline!r}; expected one of '
                     f'{roofline.MODES}')
  if s.key_layout not in decode.KEY_LAYOUTS:
    raise ValueError(f'bench.key_layout={s.key_layout!r}; expected one of '
                     f'{decode.KEY_LAYOUTS}')
  if s.readout not in decode.READOUTS:
    raise ValueError(f'bench.readout={s.readout!r}; expected one of '
                     f'{decode.READOUTS}')
  if s.attention_impl not in decode.ATTENTION_IMPLS:
    raise ValueError(f'bench.attention_impl={s.attention_impl!r}; expected '
                     f'one of {decode.ATTENTION_IMPLS}')


def check_attention(s: BenchSettings, d_model: int, num_heads: int,
                    model: str) -> None:
  """Refuses a forced 'pallas' that `model` (d_model, num_heads) or this
  jax cannot run, before the bench measures anything: its first cell
  would fail only after the ceilings."""
  if s.attention_impl != 'pallas':
    return
  misfit = decode.pallas_misfit(d_model, num_heads, s.key_layout)
  if misfit:
    layout = (f", bench.key_layout={s.key_layout!r}"
              if s.key_layout != 'auto' else '')
    raise ValueError(f"bench.attention_impl='pallas'{layout} for {model}: "
                     f'{misfit}')


def new_tokens(s: BenchSettings, seq_len: int) -> int:
  """New tokens per row: bench.max_new_tokens, or up to seq_len."""
  return s.max_new_tokens or seq_len - s.prefix_len
