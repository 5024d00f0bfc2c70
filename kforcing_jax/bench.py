"""Decoding throughput: the AR teacher (k=1) against K-Forcing students.

`run_bench(config, workdir)` times the jitted whole-decode program
`decode.decode_loop` for k = 1 (teacher) and every k in `bench.ks` (the
smallest trained student window >= k, else random weights: speed does not
depend on the weights) at every batch size in `bench.batch_sizes`, from the
same `bench.prefix_len`-token prompts to `model.seq_len` tokens. Decoding is
greedy with no eos, so every run does the full work. Compile time is
excluded and reported apart; each cell is the median of `bench.repeats`
runs after `bench.warmup` warm-up runs (plus one untimed run once every k of
the batch has compiled), and at each batch size the repeats of all k are
interleaved, so load drift on a shared machine biases no k.
It also measures this machine's matmul peak and memory bandwidth, predicts
each speedup with a roofline model of a decode step, optionally times a
Hugging Face GPT-2 of the same shape as a peer, and writes
WORKDIR/bench.json and WORKDIR/bench.png.

Roofline model of one cached forward pass over q positions per row, B rows,
of which e rows per row reach the unembedding (AR step: q=1, e=1; push-forward
step: q=2k (k tokens + k noise slots), e=k; prefill: q=P (+k), e=1 (k)),
written at cache index c, as three parts:
  weights:   FLOPs 2 * n_dense * B*q;
             bytes n_dense * dense_bytes + embedding (or noise-slot) rows.
  attention: FLOPs 4 * layers * d_model * B*q * (c + q);
             bytes 2 * layers * d_model * kv_bytes * B * (c read + q written).
  unembed:   FLOPs 2 * d_model * V * B*e; bytes d_model * V * weight_bytes
             + float32 logits written and read back (2 * 4 * B*e*V).
n_dense is every parameter that touches every position (attention and MLP
projections, biases, norms): not the embedding, unembedding, noise encoder.
Bytes per weight are those the decode loop reads: parameters are stored in
float32 (weight_bytes 4), but `decode_loop` casts the block kernels to the
compute dtype once before the loop (`model.compute_params`), so in a
bfloat16 model dense_bytes is about 2; the unembedding stays float32. That
cast is charged once per decode (cast_bytes: 4 read + 2 written per cast
weight; nothing in float32).
A student's noise encoder runs once per decode, before the loop, over all
B*N noise values (`decode.embed_noise`): FLOPs 2 * n_noise * B*N; bytes
n_noise * weight_bytes + the B*N embedded rows written in the compute dtype
(kv_bytes; each step then reads its own k rows).
Step time, by `bench.roofline`:
  'max':    max(sum FLOPs / peak, sum bytes / bandwidth) (classic roofline,
            assumes compute and memory traffic overlap perfectly);
  'sum':    sum FLOPs / peak + sum bytes / bandwidth (no overlap);
  'per_op': sum over the three parts of max(FLOPs/peak, bytes/bandwidth)
            (each part overlaps with itself only; closest to how XLA:CPU
            runs one fusion after another).
The decode time is the sum over its steps (context grows), and the predicted
speedup is T_AR / T_PF for the same useful tokens. Activations are assumed
to stay in cache; per-step launch/loop overhead is not modelled, so small
batches on CPU measure below prediction.

bench.json (schema_version 1; `validate_bench_json` checks it):
  schema_version  int, 1.
  config_name     str, config.name.
  created_unix    float, time.time() at the end of the run.
  machine         {platform, python, cpu_model, cpu_count, jax_version,
                   backend, device_kind, device_count, load_avg_start,
                   load_avg_end ([1, 5, 15]-minute load averages)}.
  settings        {batch_sizes, ks, prefix_len, max_new_tokens, repeats,
                   warmup, prompts, random_weights, peer, roofline, seed,
                   key_layout (as asked: 'auto', 'k' or 'kt'), profile
                   (bool), kernel_impl (kernels.impl of the decode loop's
                   vocabulary projection) and kernel_impl_resolved (what
                   'auto' stood for on this backend) (these four optional:
                   files written before them lack them)}.
  models          [{name, weights ('trained'|'random'), noise_window,
                   num_params, serves_k [int]}].
  roofline        {peak_flops (FLOP/s), peak_flops_dtype, matmul_size,
                   bandwidth (bytes/s, in-place copy), bandwidth_fresh_alloc
                   (bytes/s into new buffers, or null), copy_bytes,
                   measured (bool), mode ('max'|'sum'|'per_op')}.
  results         one per (k, batch): {model, weights, k, batch, new_tokens
                   (useful tokens per row), num_steps, lower_s, compile_s,
                   times_s [float], median_s, tokens_per_s, speedup (over AR
                   at the same batch; 1 for k=1), predicted_speedup (in
                   `roofline.mode`), predicted_speedup_modes {max, sum,
                   per_op, full_cache}, measured_over_predicted,
                   model_flops and model_bytes (the whole decode under the
                   roofline's cost model), achieved_flops_per_s and
                   achieved_bytes_per_s (those over median_s: how near the
                   measured peak and bandwidth each cell ran; these four
                   are optional, files written before them lack them),
                   key_layout (optional: the layout the cell decoded
                   with, 'k' or 'kt', once 'auto' is resolved for this
                   backend by decode.key_layout),
                   profile (with bench.profile=True only: {source ('device'
                   or 'host'), steps (= num_steps), ops_per_step,
                   busy_us_per_step, kinds [{kind, per_step,
                   us_per_step}], trace_dir}; see step_profile.py; a cell
                   whose tracing failed has profile_error (str) instead),
                   memory {host_rss_delta_mib, host_maxrss_mib,
                   device_peak_bytes (null on CPU; the device allocator's
                   high-water mark of the whole process so far, so not
                   per cell), compiled (dict of memory_analysis() byte
                   counts, or null: the per-cell figure; the table's
                   `peak MiB` is argument + output - alias + temp)}}.
                   full_cache: the 'max' prediction when attention reads the
                   whole preallocated cache every step (decode.py with
                   DecodeSpec.cache_block=0; by default it grows the cache
                   in blocks of 32 slots, close to the valid-slots model).
  accelerators    [{name, model ('lm1b'|'config'), peak_flops, bandwidth,
                   batch, k, predicted_speedup, ar_step_bound
                   ('compute'|'memory')}] from datasheet numbers, bf16.
  peer            {available (bool), note (str), library (str), results:
                   [{batch, tokens_per_s, median_s, times_s,
                   ours_ar_over_peer, ours_pf_over_peer, pf_k}]}.
"""

import dataclasses
import functools
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import checkpoints
from kforcing_jax import decode
from kforcing_jax import files
from kforcing_jax import model as model_lib
from kforcing_jax import projection
from kforcing_jax import sharding
from kforcing_jax import step_profile

SCHEMA_VERSION = 1
MODES = ('max', 'sum', 'per_op')

# Datasheet peaks (dense bf16 FLOP/s, memory bytes/s) for predictions.
ACCELERATORS = (
    ('H100 SXM', 989e12, 3.35e12),
    ('TPU v5e', 197e12, 819e9),
)

# The paper's LM1B model (docs/METHOD.md), served in bfloat16.
LM1B_MODEL = model_lib.ModelConfig(
    vocab_size=30522, seq_len=128, num_layers=12, d_model=768, num_heads=12,
    mlp_dim=3072, dtype='bfloat16', noise_feature_dim=768, noise_mlp_dim=3072)


# ------------------------------------------------------------------ settings


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
  roofline: str = 'max'  # Which prediction is "predicted": MODES.
  matmul_size: int = 2048  # n of the n^3 matmul that measures peak FLOP/s.
  copy_mib: int = 256  # Array size of the bandwidth measurement.
  peak_flops: float = 0.0  # FLOP/s; 0 measures it.
  bandwidth: float = 0.0  # Bytes/s; 0 measures it.
  seed: int = 0  # Prompts, noise and random weights.
  key_layout: str = 'auto'  # KV-cache key layout: decode.DecodeSpec.
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
  _check_settings(s, config.model.seq_len)
  return s


def _check_settings(s: BenchSettings, seq_len: int) -> None:
  if not s.batch_sizes or min(s.batch_sizes) < 1:
    raise ValueError(f'bench.batch_sizes={s.batch_sizes}: need positive ints')
  if not s.ks or any(k < 2 for k in s.ks):
    raise ValueError(f'bench.ks={s.ks}: need student k values >= 2 (k=1 is '
                     'the AR teacher, always timed)')
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
  if s.roofline not in MODES:
    raise ValueError(f'bench.roofline={s.roofline!r}; expected one of {MODES}')
  if s.key_layout not in decode.KEY_LAYOUTS:
    raise ValueError(f'bench.key_layout={s.key_layout!r}; expected one of '
                     f'{decode.KEY_LAYOUTS}')


def new_tokens(s: BenchSettings, seq_len: int) -> int:
  return s.max_new_tokens or seq_len - s.prefix_len


# ------------------------------------------------------------------ roofline


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the roofline needs to know about a model."""
  num_layers: int
  d_model: int
  vocab_size: int
  dense_params: int  # Parameters applied at every position.
  noise_params: int  # Noise encoder, applied at noise slots only.
  weight_bytes: float  # Bytes per embedding/unembedding/noise parameter.
  kv_bytes: float  # Bytes per KV-cache element.
  # Bytes per dense parameter as the decode loop reads it: after
  # model.compute_params, so a bfloat16 model's block kernels count 2, its
  # float32 norms 4.
  dense_bytes: float
  # Bytes that model.compute_params moves once per decode (reads the
  # stored weights it casts, writes the cast copies); 0 in float32.
  cast_bytes: float = 0.0

  @classmethod
  def of(cls, cfg: model_lib.ModelConfig, params=None) -> 'ModelShape':
    """From a config and its parameters (default: their shapes and dtypes,
    traced from cfg). Bytes per weight are those the decode loop reads."""
    if params is None:
      params = model_lib.abstract_params(cfg)
    noise = (model_lib.count_params(params['noise_encoder'])
             if 'noise_encoder' in params else 0)
    outside = ('embed', 'unembed', 'noise_encoder')
    cast = jax.eval_shape(functools.partial(model_lib.compute_params, cfg),
                          params)
    dense = [v for n, v in cast.items() if n not in outside]
    kept = [params[n] for n in outside if n in params]
    cast_bytes = sum(
        _nbytes(a) + _nbytes(b) for a, b in zip(jax.tree.leaves(params),
                                                 jax.tree.leaves(cast))
        if a.dtype != b.dtype)
    return cls(num_layers=cfg.num_layers, d_model=cfg.d_model,
               vocab_size=cfg.vocab_size, dense_params=dense_params(cfg),
               noise_params=noise, weight_bytes=_bytes_per_param(kept),
               kv_bytes=jnp.dtype(cfg.compute_dtype).itemsize,
               dense_bytes=_bytes_per_param(dense), cast_bytes=cast_bytes)


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _bytes_per_param(trees) -> float:
  leaves = jax.tree.leaves(trees)
  size = sum(math.prod(x.shape) for x in leaves)
  return sum(_nbytes(x) for x in leaves) / max(1, size)


def dense_params(cfg: model_lib.ModelConfig) -> int:
  """Parameters outside embedding, unembedding and noise encoder."""
  d, m = cfg.d_model, cfg.mlp_dim
  # q, k, v, out (no bias); mlp_in/out with bias; two LayerNorms.
  per_layer = 4 * d * d + 2 * d * m + m + d + 4 * d
  return cfg.num_layers * per_layer + 2 * d  # + final LayerNorm.


@dataclasses.dataclass(frozen=True)
class Pass:
  """One cached forward pass of a decode: per row, at cache slot `index`."""
  index: int  # Valid cached slots before the pass.
  tokens: int  # Token positions fed.
  noise: int  # Noise-slot positions fed.
  emit: int  # Rows projected to logits.


def decode_passes(prompt_len: int, k: int, num_steps: int,
                  student: bool) -> list[Pass]:
  """The passes `decode.decode_loop` makes: prefill, then num_steps-1 steps."""
  noise = k if student else 0
  passes = [Pass(0, prompt_len, noise, k)]
  for step in range(1, num_steps):
    passes.append(Pass(prompt_len + (step - 1) * k, k, noise, k))
  return passes


def pass_costs(shape: ModelShape, batch: int, p: Pass,
               cache_size: int | None = None) -> dict[str, tuple[float, float]]:
  """{part: (FLOPs, bytes)} of one pass; see the module docstring.

  cache_size: if given, attention reads all these slots (decode.py with
  DecodeSpec.cache_block=0) instead of the valid ones (decode.py grows its
  cache in blocks, so it reads at most cache_block - 1 slots past them).
  """
  q = p.tokens + p.noise
  d, layers = shape.d_model, shape.num_layers
  keys = cache_size if cache_size else p.index + q
  read = cache_size if cache_size else p.index
  w_flops = 2.0 * shape.dense_params * batch * q
  w_bytes = shape.dense_params * shape.dense_bytes
  w_bytes += batch * p.tokens * d * shape.weight_bytes  # Embedding rows.
  # The noise slots' rows, embedded before the loop in the compute dtype
  # (that of the KV cache).
  w_bytes += batch * p.noise * d * shape.kv_bytes
  a_flops = 4.0 * layers * d * batch * q * keys
  a_bytes = 2.0 * layers * d * shape.kv_bytes * batch * (read + q)
  u_flops = 2.0 * d * shape.vocab_size * batch * p.emit
  u_bytes = (d * shape.vocab_size * shape.weight_bytes
             + 2.0 * 4 * batch * p.emit * shape.vocab_size)
  return {'weights': (w_flops, w_bytes), 'attention': (a_flops, a_bytes),
          'unembed': (u_flops, u_bytes)}


def pass_time(costs: dict[str, tuple[float, float]], peak_flops: float,
              bandwidth: float, mode: str) -> float:
  """Seconds for one pass under `mode` (see MODES)."""
  if mode == 'per_op':
    return sum(max(f / peak_flops, b / bandwidth) for f, b in costs.values())
  flops = sum(f for f, _ in costs.values())
  nbytes = sum(b for _, b in costs.values())
  if mode == 'max':
    return max(flops / peak_flops, nbytes / bandwidth)
  if mode == 'sum':
    return flops / peak_flops + nbytes / bandwidth
  raise ValueError(f'roofline mode {mode!r}; expected one of {MODES}')


def predict_decode_time(shape: ModelShape, batch: int, prompt_len: int,
                        k: int, max_new: int, peak_flops: float,
                        bandwidth: float, mode: str = 'max',
                        full_cache: bool = False) -> float:
  """Roofline seconds of a whole decode of max_new tokens per row."""
  return sum(pass_time(costs, peak_flops, bandwidth, mode)
             for costs in _decode_costs(shape, batch, prompt_len, k, max_new,
                                        full_cache))


def decode_totals(shape: ModelShape, batch: int, prompt_len: int, k: int,
                  max_new: int) -> tuple[float, float]:
  """(FLOPs, bytes) of a whole decode under the cost model above: what
  `predict_decode_time` charges, summed over its passes, the noise
  encoder and the weight cast. Divided by a measured time, the rates the
  decode achieved."""
  parts = [c for costs in _decode_costs(shape, batch, prompt_len, k, max_new)
           for c in costs.values()]
  return sum(f for f, _ in parts), sum(b for _, b in parts)


def _decode_costs(shape: ModelShape, batch: int, prompt_len: int, k: int,
                  max_new: int, full_cache: bool = False) -> list[dict]:
  """{part: (FLOPs, bytes)} of each pass of a decode, then (students) of
  the noise encoder's one pass over all of its noise, then (below float32)
  of the one cast of the block weights."""
  steps = -(-max_new // k)
  cache_size = (decode.full_cache_size(prompt_len, steps, k) if full_cache
                else None)
  out = [pass_costs(shape, batch, p, cache_size)
         for p in decode_passes(prompt_len, k, steps, student=k > 1)]
  if k > 1:
    out.append({'noise': noise_encoder_costs(shape, batch, steps * k)})
  if shape.cast_bytes:
    out.append({'cast': (0.0, float(shape.cast_bytes))})
  return out


def noise_encoder_costs(shape: ModelShape, batch: int,
                        num_noise: int) -> tuple[float, float]:
  """(FLOPs, bytes) of embedding all of a decode's noise in one pass."""
  rows = batch * num_noise
  return (2.0 * shape.noise_params * rows,
          shape.noise_params * shape.weight_bytes
          + rows * shape.d_model * shape.kv_bytes)


def predicted_speedup(ar: ModelShape, pf: ModelShape, batch: int,
                      prompt_len: int, k: int, max_new: int,
                      peak_flops: float, bandwidth: float, mode: str = 'max',
                      full_cache: bool = False) -> float:
  """PF tokens/s over AR tokens/s for the same useful tokens: T_AR / T_PF."""
  args = (batch, prompt_len)
  t_ar = predict_decode_time(ar, *args, 1, max_new, peak_flops, bandwidth,
                             mode, full_cache)
  t_pf = predict_decode_time(pf, *args, k, max_new, peak_flops, bandwidth,
                             mode, full_cache)
  return t_ar / t_pf


def ar_step_bound(shape: ModelShape, batch: int, context: int,
                  peak_flops: float, bandwidth: float) -> str:
  """'compute' or 'memory': which limit sets an AR step at `context`."""
  costs = pass_costs(shape, batch, Pass(context, 1, 0, 1))
  flops = sum(f for f, _ in costs.values())
  nbytes = sum(b for _, b in costs.values())
  return 'compute' if flops / peak_flops > nbytes / bandwidth else 'memory'


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # Warm-up (and compile, for jitted fns).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_peak_flops(n: int = 2048, repeats: int = 5,
                       dtype=jnp.float32) -> float:
  """FLOP/s of a jitted n x n x n matmul (median of repeats)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2.0 * n ** 3 / _median_seconds(lambda: matmul(a, b), repeats)


def measure_bandwidth(mib: int = 256, repeats: int = 5,
                      in_place: bool = True) -> tuple[float, int]:
  """(bytes/s, bytes moved per run) of a jitted `x * s` over `mib` MiB f32.

  The scale s is a runtime argument so XLA cannot fold the op away; each
  run reads the array once and writes it once. in_place donates the input,
  so the output reuses its buffer; otherwise every run writes a freshly
  allocated array, and on CPU the first-touch page faults of that
  allocation dominate (an order of magnitude slower).
  """
  x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
  moved = 2 * x.nbytes
  one = jnp.float32(1.0)
  if not in_place:
    scale = jax.jit(lambda x, s: x * s)
    return moved / _median_seconds(lambda: scale(x, one), repeats), moved
  scale = jax.jit(lambda x, s: x * s, donate_argnums=0)
  box = [x]

  def run():
    box[0] = scale(box[0], one)
    return box[0]

  return moved / _median_seconds(run, repeats), moved


# ------------------------------------------------------------------ models


@dataclasses.dataclass
class BenchModel:
  name: str  # Run directory name, or 'random_teacher' / 'random_student'.
  weights: str  # 'trained' or 'random'.
  cfg: model_lib.ModelConfig
  params: Any
  serves_k: list[int] = dataclasses.field(default_factory=list)


def _has_run(workdir: str, name: str) -> bool:
  manager = checkpoints.Manager(os.path.join(workdir, name))
  return manager.latest_step() is not None


def load_models(config, workdir: str,
                s: BenchSettings) -> dict[int, BenchModel]:
  """{k: model} for k = 1 and every k in s.ks.

  k=1 is the teacher run; k>1 the smallest trained window >= k. Whatever
  is missing (or everything, with random_weights) gets random weights of
  the same backbone: the trained teacher's shape if there is one, else
  config.model.
  """
  loaded: dict[str, BenchModel] = {}
  base_cfg = None

  def trained(name):
    if name not in loaded:
      cfg, params, _ = checkpoints.load_params(os.path.join(workdir, name))
      loaded[name] = BenchModel(name, 'trained', cfg, params)
    return loaded[name]

  models: dict[int, BenchModel] = {}
  if not s.random_weights and _has_run(workdir, 'teacher'):
    models[1] = trained('teacher')
    base_cfg = models[1].cfg
  windows = [] if s.random_weights else [
      w for w in checkpoints.trained_windows(workdir)
      if _has_run(workdir, f'student_k{w}')]
  for k in s.ks:
    fits = [w for w in windows if w >= k]
    if fits:
      models[k] = trained(f'student_k{fits[0]}')
      base_cfg = base_cfg or dataclasses.replace(models[k].cfg,
                                                 noise_window=0)
  missing = [k for k in [1, *s.ks] if k not in models]
  if missing:
    base_cfg = base_cfg or model_lib.ModelConfig.from_config(config.model)
    window = max([*s.ks, 1])
    student_cfg = dataclasses.replace(base_cfg, noise_window=window)
    # Jitted: eager init dispatches (and compiles) op by op, ~3x slower.
    params = jax.jit(model_lib.init_params, static_argnums=0)(
        student_cfg, jax.random.PRNGKey(s.seed))
    # The random teacher is the same backbone without the noise encoder.
    random_teacher = BenchModel(
        'random_teacher', 'random', dataclasses.replace(base_cfg,
                                                        noise_window=0),
        {n: v for n, v in params.items() if n != 'noise_encoder'})
    random_student = BenchModel('random_student', 'random', student_cfg,
                                params)
    for k in missing:
      models[k] = random_teacher if k == 1 else random_student
  for k, m in sorted(models.items()):
    m.serves_k.append(k)
  return models


def make_prompts(config, workdir: str, s: BenchSettings, batch: int,
                 vocab_size: int) -> np.ndarray:
  """(batch, prefix_len) int32 prompts: random ids or held-out prefixes."""
  if s.prompts == 'heldout':
    from kforcing_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    tokenizer = data_lib.get_tokenizer(config, workdir)
    rows = data_lib.make_eval_batches(config, tokenizer, workdir,
                                      batch_size=1, num_batches=batch)
    prefixes = np.concatenate(rows)[:, :s.prefix_len]
    # A short split repeats its prefixes; speed does not depend on them.
    return np.resize(prefixes, (batch, s.prefix_len)).astype(np.int32)
  rng = np.random.default_rng(s.seed)
  # Id 0 is often padding; real prompts avoid it.
  return rng.integers(1, vocab_size, (batch, s.prefix_len), dtype=np.int32)


# ------------------------------------------------------------------ timing


class _PeakRss:
  """Samples this process's RSS on a thread; `.peak` is the max seen."""

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.peak = _rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      self._stop.wait(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
  """Current resident set size (psutil, else /proc, else peak RSS)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().memory_info().rss
  except ImportError:
    pass
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return _maxrss_bytes()


def _maxrss_bytes() -> int:
  scale = 1 if sys.platform == 'darwin' else 1024  # Linux reports KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()  # None on CPU.
  if not stats:
    return None
  return int(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))


def compiled_peak_bytes(memory) -> int | None:
  """A cell's device footprint from its compiled memory analysis:
  arguments (weights, prompts, noise) + outputs - aliased + temporaries
  (the KV cache lives in the loop's temporaries). None if not reported."""
  c = memory.get('compiled')
  if not c or 'temp_size_in_bytes' not in c:
    return None
  return (c.get('argument_size_in_bytes', 0) + c.get('output_size_in_bytes', 0)
          - c.get('alias_size_in_bytes', 0) + c['temp_size_in_bytes'])


def _compiled_memory(compiled) -> dict[str, int] | None:
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Not every backend implements it.
  if ma is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'alias_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes')
  return {f: int(getattr(ma, f)) for f in fields if hasattr(ma, f)}


@dataclasses.dataclass
class Cell:
  """One compiled (model, k, batch) decode, warmed up and ready to time."""
  model: BenchModel
  k: int
  batch: int
  max_new: int
  steps: int
  compiled: Any
  args: tuple
  lower_s: float
  compile_s: float
  memory: dict[str, Any]
  key_layout: str  # Resolved: decode.key_layout(spec), 'k' or 'kt'.
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self) -> None:
    """One whole decode, waiting for its results; `run_once` times it."""
    jax.block_until_ready(self.compiled(*self.args))

  def run_once(self) -> float:
    """Seconds of one whole decode (dispatch to results on host)."""
    start = time.perf_counter()
    self.run()
    seconds = time.perf_counter() - start
    self.times.append(seconds)
    return seconds

  def result(self) -> dict[str, Any]:
    median = float(np.median(self.times))
    return {
        'model': self.model.name, 'weights': self.model.weights, 'k': self.k,
        'batch': self.batch, 'new_tokens': self.max_new,
        'num_steps': self.steps, 'lower_s': self.lower_s,
        'compile_s': self.compile_s, 'times_s': list(self.times),
        'median_s': median,
        'tokens_per_s': self.batch * self.max_new / median,
        'key_layout': self.key_layout, 'memory': self.memory}


def prepare_cell(m: BenchModel, k: int, prompts_BxP: np.ndarray,
                 max_new: int, s: BenchSettings) -> Cell:
  """Lowers, compiles and warms up decode_loop for one (model, k, batch)."""
  batch, prompt_len = prompts_BxP.shape
  steps = -(-max_new // k)
  spec = decode.DecodeSpec(model=m.cfg, k=k, num_steps=steps,
                           prompt_len=prompt_len, greedy=True,
                           key_layout=s.key_layout, kernel_impl=s.kernel_impl)
  rng = np.random.default_rng(s.seed + k)
  args = (m.params, jnp.asarray(prompts_BxP),
          jnp.zeros((batch,), jnp.int32),
          jnp.asarray(rng.random((batch, steps * k), np.float32)),
          jnp.float32(1.0), jnp.float32(0.0))
  start = time.perf_counter()
  lowered = decode.decode_loop.lower(spec, *args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  rss_before = _rss_bytes()
  # The first warm-up run (at least one is made) also samples peak RSS.
  with _PeakRss() as rss:
    tokens, _ = jax.block_until_ready(compiled(*args))
  if tokens.shape != (batch, steps * k):
    raise RuntimeError(f'decode_loop returned {tokens.shape}, expected '
                       f'{(batch, steps * k)}')
  for _ in range(s.warmup - 1):
    jax.block_until_ready(compiled(*args))
  memory = {'host_rss_delta_mib': (rss.peak - rss_before) / 2 ** 20,
            'host_maxrss_mib': _maxrss_bytes() / 2 ** 20,
            'device_peak_bytes': _device_peak_bytes(),
            'compiled': _compiled_memory(compiled)}
  return Cell(m, k, batch, max_new, steps, compiled, args, lower_s,
              compile_s, memory, decode.key_layout(spec))


def time_batch(models: dict[int, BenchModel], prompts_BxP: np.ndarray,
               max_new: int, s: BenchSettings) -> list[Cell]:
  """Times every k at one batch size, repeats interleaved round-robin.

  Interleaving means a slow spell of a shared machine hits every k alike,
  so the speedups (ratios within a batch) stay fair. Each cell is warmed up
  when it is compiled, but the others compile after it; so every cell runs
  once more, untimed, right before the timed rounds (on an H100 the first
  run after the others had compiled was 20-70% slow).
  """
  cells = [prepare_cell(m, k, prompts_BxP, max_new, s)
           for k, m in sorted(models.items())]
  for cell in cells:
    cell.run()
  for _ in range(s.repeats):
    for cell in cells:
      cell.run_once()
  return cells


# ------------------------------------------------------------------ peer


def run_peer(cfg: model_lib.ModelConfig, prompts: dict[int, np.ndarray],
             max_new: int, s: BenchSettings,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Times HF GPT2LMHeadModel.generate of the same shape, if installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'available': False, 'library': '', 'results': [],
            'note': f'peer skipped: {e.name} is not installed (pip install '
                    '".[eval]", i.e. torch and transformers)'}
  threads = len(os.sched_getaffinity(0)) if hasattr(
      os, 'sched_getaffinity') else os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(s.seed)
  # The peer runs where ours does: on the GPU when JAX decodes on one.
  device = ('cuda' if jax.default_backend() == 'gpu' and
            torch.cuda.is_available() else 'cpu')

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  # No bos/eos: random weights, and every row must decode all tokens.
  hf_cfg = transformers.GPT2Config(
      n_layer=cfg.num_layers, n_embd=cfg.d_model, n_head=cfg.num_heads,
      n_positions=cfg.seq_len, vocab_size=cfg.vocab_size,
      n_inner=cfg.mlp_dim, bos_token_id=None, eos_token_id=None,
      pad_token_id=0)
  model = transformers.GPT2LMHeadModel(hf_cfg).eval().to(device)
  if cfg.dtype == 'bfloat16':
    model = model.to(torch.bfloat16)
  results = []
  with torch.inference_mode():
    for batch, prompt in sorted(prompts.items()):
      ids = torch.as_tensor(prompt, dtype=torch.long, device=device)

      def gen(ids=ids):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
            use_cache=True)

      out = gen()  # Warm-up.
      if out.shape != (batch, prompt.shape[1] + max_new):
        raise RuntimeError(f'HF generate returned {tuple(out.shape)}')
      for _ in range(s.warmup - 1):
        gen()
      times = []
      for _ in range(s.repeats):
        sync()
        start = time.perf_counter()
        gen()
        sync()
        times.append(time.perf_counter() - start)
      median = float(np.median(times))
      results.append({'batch': batch, 'median_s': median, 'times_s': times,
                      'tokens_per_s': batch * max_new / median})
      log(f'[bench] peer HF GPT-2 batch={batch}: '
          f'{results[-1]["tokens_per_s"]:.1f} tok/s (median {median:.3f} s)')
  return {'available': True, 'results': results,
          'library': f'torch {torch.__version__}, transformers '
                     f'{transformers.__version__}, ' + (
                         torch.cuda.get_device_name() if device == 'cuda'
                         else f'{threads} threads'),
          'note': 'GPT2LMHeadModel, same layers/width/heads/MLP/vocab, random '
                  'weights, greedy generate with use_cache, no eos'}


# ------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
  cpu_model = platform.processor() or ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          cpu_model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return {
      'platform': platform.platform(), 'python': platform.python_version(),
      'cpu_model': cpu_model,
      'cpu_count': (len(os.sched_getaffinity(0))
                    if hasattr(os, 'sched_getaffinity') else os.cpu_count()),
      'jax_version': jax.__version__, 'backend': jax.default_backend(),
      'device_kind': dev.device_kind, 'device_count': jax.device_count(),
      'load_avg_start': list(os.getloadavg())}


def runnable_others(samples: int = 5, interval_s: float = 0.1,
                    path: str = '/proc/loadavg') -> float | None:
  """Runnable tasks other than the reading one, now: the median over a few
  reads of the running count in /proc/loadavg, minus the reader. None
  where that file is missing or unreadable (not Linux)."""
  counts = []
  for i in range(samples):
    if i:
      time.sleep(interval_s)
    try:
      with open(path) as f:
        running = int(f.read().split()[3].split('/')[0])
    except (OSError, ValueError, IndexError):
      return None
    counts.append(running - 1)
  return float(np.median(counts))


# ------------------------------------------------------------------ run


def _predictions(ar: ModelShape, pf: ModelShape, batch: int, k: int,
                 prompt_len: int, max_new: int, roof: dict) -> dict:
  args = (ar, pf, batch, prompt_len, k, max_new, roof['peak_flops'],
          roof['bandwidth'])
  out = {mode: predicted_speedup(*args, mode=mode) for mode in MODES}
  out['full_cache'] = predicted_speedup(*args, mode='max', full_cache=True)
  return out


def _shape_of(m: BenchModel) -> ModelShape:
  return ModelShape.of(m.cfg, m.params)


def accelerator_predictions(cfg: model_lib.ModelConfig, s: BenchSettings,
                            max_new: int) -> list[dict[str, Any]]:
  """Datasheet roofline ('max') for the LM1B model and this config, bf16."""
  rows = []
  models = (('lm1b', LM1B_MODEL, LM1B_MODEL.seq_len - s.prefix_len),
            ('config', dataclasses.replace(cfg, dtype='bfloat16'), max_new))
  for name, peak, bw in ACCELERATORS:
    for label, mcfg, new in models:
      ar = ModelShape.of(mcfg)
      pf = ModelShape.of(dataclasses.replace(mcfg, noise_window=max(s.ks)))
      for batch in s.batch_sizes:
        bound = ar_step_bound(ar, batch, s.prefix_len + new // 2, peak, bw)
        for k in s.ks:
          rows.append({
              'name': name, 'model': label, 'peak_flops': peak,
              'bandwidth': bw, 'batch': batch, 'k': k,
              'predicted_speedup': predicted_speedup(
                  ar, pf, batch, s.prefix_len, k, new, peak, bw, 'max'),
              'ar_step_bound': bound})
  return rows


def run_bench(config, workdir: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark; writes WORKDIR/bench.json and WORKDIR/bench.png.

  Returns the bench.json dict (see the module docstring).
  """
  s = settings_from_config(config)
  os.makedirs(workdir, exist_ok=True)
  machine = machine_info()
  models = load_models(config, workdir, s)
  seq_len = min(m.cfg.seq_len for m in models.values())
  _check_settings(s, seq_len)
  max_new = new_tokens(s, seq_len)
  if s.prefix_len + max_new > seq_len:
    raise ValueError(f'bench.prefix_len + max_new_tokens = '
                     f'{s.prefix_len + max_new} > model.seq_len={seq_len}')
  ar_cfg = models[1].cfg
  untrained = [k for k, m in sorted(models.items()) if m.weights == 'random']
  if untrained and not s.random_weights:  # Asked-for ones need no notice.
    log(f'[bench] NOTE: no trained run in {workdir} serves k={untrained}: '
        'timed with random weights of the same shape (speed does not '
        'depend on them; bench.random_weights=True says so up front)')
  log(f'[bench] {config.get("name", "?")}: {machine["cpu_count"]} cores '
      f'({machine["cpu_model"]}), backend {machine["backend"]} '
      f'({machine["device_kind"]}); {s.prefix_len}-token prompts + '
      f'{max_new} new tokens; batches {list(s.batch_sizes)}; k = 1, '
      f'{list(s.ks)}; median of {s.repeats} (interleaved)')

  # Other work on the cores skews every number below, torch's most. The
  # 1-minute load average also counts this process's own work just before
  # (the pipeline's evaluate stage), so where /proc allows, ask what else
  # is runnable now.
  others = runnable_others()
  if others is None:
    busy = machine['load_avg_start'][0]
    what = f'1-minute load average {busy:.1f}'
  else:
    busy, what = others, f'{others:g} other runnable processes'
  if busy > 0.5 * machine['cpu_count']:
    log(f'[bench] WARNING: {what} on {machine["cpu_count"]} cores: this '
        'machine is busy, timings will be noisy; rerun on a quiet machine '
        'for numbers to report')
  roof = _roofline_numbers(s, ar_cfg, log)
  vocab = min(m.cfg.vocab_size for m in models.values())
  big = make_prompts(config, workdir, s, max(s.batch_sizes), vocab)
  # Every batch size decodes the first rows of the same prompts.
  prompts = {b: big[:b] for b in s.batch_sizes}

  results = []
  for batch in s.batch_sizes:
    cells = time_batch(models, prompts[batch], max_new, s)
    for cell in cells:
      r = cell.result()
      results.append(r)
      spread = (max(r['times_s']) - min(r['times_s'])) / r['median_s']
      log(f'[bench] {r["model"]} ({r["weights"]}) k={r["k"]} '
          f'batch={batch}: {r["tokens_per_s"]:.1f} tok/s, median '
          f'{r["median_s"]:.4f} s (spread {100 * spread:.0f}%), compile '
          f'{r["compile_s"]:.2f} s, RSS '
          f'+{r["memory"]["host_rss_delta_mib"]:.1f} MiB, peak '
          f'{_mib(compiled_peak_bytes(r["memory"]))} MiB (compiled)')
    if s.profile:  # After the timed runs, so tracing cannot slow them.
      _profile_cells(cells, results[-len(cells):], workdir, log)

  ar_shape = _shape_of(models[1])
  ar_tps = {r['batch']: r['tokens_per_s'] for r in results if r['k'] == 1}
  for r in results:
    pf_shape = _shape_of(models[r['k']]) if r['k'] > 1 else ar_shape
    preds = _predictions(ar_shape, pf_shape, r['batch'], r['k'],
                         s.prefix_len, max_new, roof)
    r['speedup'] = r['tokens_per_s'] / ar_tps[r['batch']]
    r['predicted_speedup_modes'] = preds
    r['predicted_speedup'] = preds[s.roofline]
    r['measured_over_predicted'] = r['speedup'] / r['predicted_speedup']
    flops, nbytes = decode_totals(pf_shape, r['batch'], s.prefix_len,
                                  r['k'], max_new)
    r['model_flops'], r['model_bytes'] = flops, nbytes
    r['achieved_flops_per_s'] = flops / r['median_s']
    r['achieved_bytes_per_s'] = nbytes / r['median_s']

  peer = {'available': False, 'library': '', 'results': [],
          'note': 'disabled (bench.peer=False)'}
  if s.peer:
    peer = run_peer(ar_cfg, prompts, max_new, s, log)
  if not peer['available']:
    log(f'[bench] {peer["note"]}')
  pf_k = 4 if 4 in s.ks else max(s.ks, default=1)
  pf_tps = {r['batch']: r['tokens_per_s'] for r in results if r['k'] == pf_k}
  for p in peer['results']:
    p['pf_k'] = pf_k
    p['ours_ar_over_peer'] = ar_tps[p['batch']] / p['tokens_per_s']
    p['ours_pf_over_peer'] = pf_tps[p['batch']] / p['tokens_per_s']

  machine['load_avg_end'] = list(os.getloadavg())
  out = {
      'schema_version': SCHEMA_VERSION,
      'config_name': str(config.get('name', '')),
      'created_unix': time.time(),
      'machine': machine,
      'settings': {
          'batch_sizes': list(s.batch_sizes), 'ks': list(s.ks),
          'prefix_len': s.prefix_len, 'max_new_tokens': max_new,
          'repeats': s.repeats, 'warmup': s.warmup, 'prompts': s.prompts,
          'random_weights': s.random_weights, 'peer': s.peer,
          'roofline': s.roofline, 'seed': s.seed,
          'key_layout': s.key_layout, 'profile': s.profile,
          'kernel_impl': s.kernel_impl,
          'kernel_impl_resolved': projection.resolved(s.kernel_impl)},
      'models': _model_entries(models),
      'roofline': roof,
      'results': results,
      'accelerators': accelerator_predictions(ar_cfg, s, max_new),
      'peer': peer,
  }
  validate_bench_json(out)
  log(format_tables(out))
  if sharding.is_main_process():  # Each process timed its own devices.
    files.atomic_write_text(os.path.join(workdir, 'bench.json'),
                            json.dumps(out, indent=1))
    plot_bench(out, os.path.join(workdir, 'bench.png'))
    log(f'[bench] wrote {os.path.join(workdir, "bench.json")} and bench.png')
  return out


def _profile_cells(cells: list[Cell], results: list[dict[str, Any]],
                   workdir: str, log: Callable[[str], None]) -> None:
  """Traces one more decode of each cell; adds r['profile'] and logs one
  batch's table."""
  process = (f'_p{jax.process_index()}' if jax.process_count() > 1 else '')
  labelled = []
  for cell, r in zip(cells, results):
    name = f'{r["model"]}_k{r["k"]}_b{r["batch"]}{process}'
    try:
      r['profile'] = step_profile.profile_run(
          cell.run, os.path.join(workdir, 'profile', name), cell.steps)
    except Exception as e:  # pylint: disable=broad-except
      # The timings are made; a failed trace must not lose them.
      r['profile_error'] = f'{type(e).__name__}: {e}'
      log(f'[bench] WARNING: profiling {name} failed ({r["profile_error"]});'
          ' its timings stand, its profile is left out')
      continue
    labelled.append((f'k={r["k"]}', r['profile']))
  if labelled:
    log(step_profile.format_profiles(results[0]['batch'], labelled))


def _roofline_numbers(s: BenchSettings, cfg: model_lib.ModelConfig,
                      log) -> dict[str, Any]:
  measured = not (s.peak_flops and s.bandwidth)
  dtype = jnp.dtype(cfg.compute_dtype)
  peak = s.peak_flops or measure_peak_flops(s.matmul_size, s.repeats, dtype)
  fresh = None
  if s.bandwidth:
    bw, moved = s.bandwidth, 0
  else:
    bw, moved = measure_bandwidth(s.copy_mib, s.repeats)
    # For reference: the same op into a new buffer (page-fault bound).
    fresh, _ = measure_bandwidth(s.copy_mib, s.repeats, in_place=False)
  log(f'[bench] roofline: peak {peak / 1e9:.1f} GFLOP/s ({dtype.name} '
      f'{s.matmul_size}^3 matmul), bandwidth {bw / 1e9:.2f} GB/s in place'
      + (f', {fresh / 1e9:.2f} GB/s into fresh buffers' if fresh else '') +
      f' ({"measured" if measured else "given"}); '
      f'ridge {peak / bw:.1f} FLOP/byte; mode {s.roofline!r}')
  return {'peak_flops': float(peak), 'peak_flops_dtype': dtype.name,
          'matmul_size': s.matmul_size, 'bandwidth': float(bw),
          'bandwidth_fresh_alloc': None if fresh is None else float(fresh),
          'copy_bytes': int(moved), 'measured': measured, 'mode': s.roofline}


def _model_entries(models: dict[int, BenchModel]) -> list[dict[str, Any]]:
  seen, out = set(), []
  for m in models.values():
    if id(m) in seen:
      continue
    seen.add(id(m))
    out.append({'name': m.name, 'weights': m.weights,
                'noise_window': m.cfg.noise_window,
                'num_params': int(model_lib.count_params(m.params)),
                'serves_k': list(m.serves_k)})
  return out


# ------------------------------------------------------------------ report


def _mib(num_bytes) -> str:
  return '-' if num_bytes is None else f'{num_bytes / 2 ** 20:.1f}'


def format_tables(d: dict[str, Any]) -> str:
  """The measured table, the peer comparison and the accelerator table."""
  mode = d['roofline']['mode']
  lines = [f'\nbatch  k  model            tok/s      speedup  '
           f'pred({mode})  pred(sum)  meas/pred  GFLOP/s     GB/s  '
           f'peak MiB']
  for r in sorted(d['results'], key=lambda r: (r['batch'], r['k'])):
    rates = ''.join(  # Files written before these fields lack them.
        f'  {r[key] / 1e9:7.1f}' if key in r else f'  {"-":>7s}'
        for key in ('achieved_flops_per_s', 'achieved_bytes_per_s'))
    lines.append(
        f'{r["batch"]:5d}  {r["k"]:d}  {r["model"]:15s} '
        f'{r["tokens_per_s"]:10.1f}  {r["speedup"]:7.2f}  '
        f'{r["predicted_speedup"]:9.2f}  '
        f'{r["predicted_speedup_modes"]["sum"]:9.2f}  '
        f'{r["measured_over_predicted"]:9.2f}' + rates +
        f'  {_mib(compiled_peak_bytes(r["memory"])):>8s}')
  roof = d['roofline']
  lines.append(f'(GFLOP/s, GB/s: the roofline cost model\'s FLOPs and bytes '
               f'of each decode over its median time; measured ceilings '
               f'{roof["peak_flops"] / 1e9:.1f} GFLOP/s and '
               f'{roof["bandwidth"] / 1e9:.1f} GB/s; peak MiB: the compiled '
               f'decode\'s arguments + outputs - aliased + temporaries)')
  peer = d['peer']
  if peer['available']:
    pf_k = peer['results'][0]['pf_k'] if peer['results'] else '?'
    lines.append(f'\npeer: {peer["library"]}')
    lines.append(f'batch  HF tok/s    ours AR / HF  ours k={pf_k} / HF')
    for p in peer['results']:
      lines.append(f'{p["batch"]:5d}  {p["tokens_per_s"]:9.1f}  '
                   f'{p["ours_ar_over_peer"]:12.2f}  '
                   f'{p["ours_pf_over_peer"]:12.2f}')
  else:
    lines.append(f'\npeer: {peer["note"]}')
  ks = d['settings']['ks']
  lines.append('\nroofline (max) speedup from datasheet numbers, bf16 '
               'weights and KV cache:')
  lines.append('accelerator  model   batch  AR step  ' +
               '  '.join(f'k={k:<3d}' for k in ks))
  groups: dict[tuple, dict] = {}
  for a in d['accelerators']:
    g = groups.setdefault((a['name'], a['model'], a['batch']),
                          {'bound': a['ar_step_bound']})
    g[a['k']] = a['predicted_speedup']
  for (name, model, batch), g in groups.items():
    lines.append(f'{name:11s}  {model:6s}  {batch:5d}  {g["bound"]:7s}  ' +
                 '  '.join(f'{g[k]:5.2f}' for k in ks))
  return '\n'.join(lines)


def plot_bench(d: dict[str, Any], path: str) -> None:
  """Speedup over AR vs batch (measured, ideal k, roofline) + tokens/s."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  batches = d['settings']['batch_sizes']
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  by_k: dict[int, list] = {}
  for r in d['results']:
    by_k.setdefault(r['k'], []).append(r)
  for i, (k, rows) in enumerate(sorted(by_k.items())):
    rows = sorted(rows, key=lambda r: r['batch'])
    c = colors[i % len(colors)]
    xs = [r['batch'] for r in rows]
    label = 'AR teacher' if k == 1 else f'k={k}'
    ax2.plot(xs, [r['tokens_per_s'] for r in rows], 'o-', color=c,
             label=label)
    if k == 1:
      continue
    ax.plot(xs, [r['speedup'] for r in rows], 'o-', color=c,
            label=f'k={k} measured')
    ax.plot(xs, [r['predicted_speedup'] for r in rows], ':', color=c,
            label=f'k={k} roofline')
    ax.axhline(k, color=c, linestyle='--', linewidth=1, label=f'k={k} ideal')
  ax.axhline(1.0, color='gray', linewidth=0.8)
  peer = d['peer']
  if peer['available'] and peer['results']:
    rows = sorted(peer['results'], key=lambda p: p['batch'])
    ax2.plot([p['batch'] for p in rows], [p['tokens_per_s'] for p in rows],
             's--', color='black', label='HF GPT-2 (peer)')
  for a in (ax, ax2):
    a.set_xscale('log', base=2)
    a.set_xticks(batches)
    a.set_xticklabels([str(b) for b in batches])
    a.set_xlabel('batch size')
    a.grid(True, which='both', alpha=0.3)
  ax.set_ylabel('speedup over AR (tokens/s ratio)')
  ax.set_title(f'Speedup (roofline: {d["roofline"]["mode"]})')
  ax.legend(fontsize=7, ncol=2)
  ax2.set_yscale('log')
  ax2.set_ylabel('tokens / s')
  ax2.set_title('Decoding throughput')
  ax2.legend(fontsize=8)
  m = d['machine']
  device = (m['cpu_model'] if m['backend'] == 'cpu' else m['device_kind'])
  fig.suptitle(f'{d["config_name"]}: {m["backend"]} ({device}), '
               f'{m["cpu_count"]} cores; {d["settings"]["prefix_len"]}-token '
               f'prompts + {d["settings"]["max_new_tokens"]} new tokens, '
               f'median of {d["settings"]["repeats"]}', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------ schema

_NUM = 'number'
_OPT_NUM = 'number or null'
_OPT_DICT = 'object or null'


def _is(value, kind) -> bool:
  if kind == _NUM:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
  if kind == _OPT_NUM:
    return value is None or _is(value, _NUM)
  if kind == _OPT_DICT:
    return value is None or isinstance(value, dict)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


_TOP = {'schema_version': int, 'config_name': str, 'created_unix': _NUM,
        'machine': dict, 'settings': dict, 'models': list, 'roofline': dict,
        'results': list, 'accelerators': list, 'peer': dict}
_MACHINE = {'platform': str, 'python': str, 'cpu_model': str,
            'cpu_count': int, 'jax_version': str, 'backend': str,
            'device_kind': str, 'device_count': int, 'load_avg_start': list,
            'load_avg_end': list}
_SETTINGS = {'batch_sizes': list, 'ks': list, 'prefix_len': int,
             'max_new_tokens': int, 'repeats': int, 'warmup': int,
             'prompts': str, 'random_weights': bool, 'peer': bool,
             'roofline': str, 'seed': int}
# Added after schema_version 1 files were written: checked when present.
_SETTINGS_OPTIONAL = {'key_layout': str, 'profile': bool, 'kernel_impl': str,
                      'kernel_impl_resolved': str}
_MODEL = {'name': str, 'weights': str, 'noise_window': int,
          'num_params': int, 'serves_k': list}
_ROOFLINE = {'peak_flops': _NUM, 'peak_flops_dtype': str, 'matmul_size': int,
             'bandwidth': _NUM, 'bandwidth_fresh_alloc': _OPT_NUM,
             'copy_bytes': int, 'measured': bool,
             'mode': str}
_RESULT = {'model': str, 'weights': str, 'k': int, 'batch': int,
           'new_tokens': int, 'num_steps': int, 'lower_s': _NUM,
           'compile_s': _NUM, 'times_s': list, 'median_s': _NUM,
           'tokens_per_s': _NUM, 'speedup': _NUM, 'predicted_speedup': _NUM,
           'predicted_speedup_modes': dict, 'measured_over_predicted': _NUM,
           'memory': dict}
# Added after schema_version 1 files were written: checked when present.
_RESULT_OPTIONAL = ('model_flops', 'model_bytes', 'achieved_flops_per_s',
                    'achieved_bytes_per_s')
_RESULT_OPTIONAL_FIELDS = {'key_layout': str, 'profile_error': str}
_PROFILE = {'source': str, 'steps': int, 'ops_per_step': _NUM,
            'busy_us_per_step': _NUM, 'kinds': list, 'trace_dir': str}
_PROFILE_KIND = {'kind': str, 'per_step': _NUM, 'us_per_step': _NUM}
_MEMORY = {'host_rss_delta_mib': _NUM, 'host_maxrss_mib': _NUM,
           'device_peak_bytes': _OPT_NUM, 'compiled': _OPT_DICT}
_ACCEL = {'name': str, 'model': str, 'peak_flops': _NUM, 'bandwidth': _NUM,
          'batch': int, 'k': int, 'predicted_speedup': _NUM,
          'ar_step_bound': str}
_PEER = {'available': bool, 'note': str, 'library': str, 'results': list}
_PEER_RESULT = {'batch': int, 'tokens_per_s': _NUM, 'median_s': _NUM,
                'times_s': list, 'ours_ar_over_peer': _NUM,
                'ours_pf_over_peer': _NUM, 'pf_k': int}


def _check_fields(obj, spec: dict, where: str) -> None:
  if not isinstance(obj, dict):
    raise ValueError(f'bench.json: {where} must be an object, got '
                     f'{type(obj).__name__}')
  for key, kind in spec.items():
    if key not in obj:
      raise ValueError(f'bench.json: {where}.{key} is missing')
    if not _is(obj[key], kind):
      name = kind if isinstance(kind, str) else kind.__name__
      raise ValueError(f'bench.json: {where}.{key} must be {name}, got '
                       f'{obj[key]!r}')


def _check_optional(obj: dict, spec: dict, where: str) -> None:
  _check_fields(obj, {k: v for k, v in spec.items() if k in obj}, where)


def _check_profile(r: dict, profiled: bool, where: str) -> None:
  """A result's profile: there iff bench.profile (or its error instead),
  per-step figures of this result's own steps."""
  has = 'profile' in r or 'profile_error' in r
  if has != profiled:
    raise ValueError(f'bench.json: {where} ' + (
        'has a profile but settings.profile is not true' if has else
        'has no profile (nor profile_error) though settings.profile is '
        'true'))
  if 'profile' not in r:
    return
  p = r['profile']
  _check_fields(p, _PROFILE, f'{where}.profile')
  if p['source'] not in ('device', 'host'):
    raise ValueError(f'bench.json: {where}.profile.source={p["source"]!r} '
                     "not in ('device', 'host')")
  if p['steps'] != r['num_steps']:
    raise ValueError(f'bench.json: {where}.profile.steps={p["steps"]} but '
                     f'num_steps={r["num_steps"]}')
  rows = [(f'{where}.profile', p, ('ops_per_step', 'busy_us_per_step'))]
  for j, kind in enumerate(p['kinds']):
    _check_fields(kind, _PROFILE_KIND, f'{where}.profile.kinds[{j}]')
    rows.append((f'{where}.profile.kinds[{j}]', kind,
                 ('per_step', 'us_per_step')))
  for name, obj, keys in rows:
    for key in keys:
      if obj[key] < 0:
        raise ValueError(f'bench.json: {name}.{key}={obj[key]!r} must be '
                         '>= 0')


def validate_bench_json(d: dict[str, Any]) -> None:
  """Checks the bench.json schema; raises ValueError naming the bad key."""
  _check_fields(d, _TOP, 'bench')
  if d['schema_version'] != SCHEMA_VERSION:
    raise ValueError(f'bench.json: bench.schema_version is '
                     f'{d["schema_version"]}, expected {SCHEMA_VERSION}')
  _check_fields(d['machine'], _MACHINE, 'machine')
  _check_fields(d['settings'], _SETTINGS, 'settings')
  _check_optional(d['settings'], _SETTINGS_OPTIONAL, 'settings')
  layout = d['settings'].get('key_layout', 'auto')
  if layout not in decode.KEY_LAYOUTS:
    raise ValueError(f'bench.json: settings.key_layout={layout!r} not in '
                     f'{decode.KEY_LAYOUTS}')
  for key in ('kernel_impl', 'kernel_impl_resolved'):
    impl = d['settings'].get(key, 'auto')
    if impl not in projection.IMPLS:
      raise ValueError(f'bench.json: settings.{key}={impl!r} not in '
                       f'{projection.IMPLS}')
  profiled = d['settings'].get('profile', False)
  _check_fields(d['roofline'], _ROOFLINE, 'roofline')
  if d['roofline']['mode'] not in MODES:
    raise ValueError(f'bench.json: roofline.mode={d["roofline"]["mode"]!r} '
                     f'not in {MODES}')
  for key in ('peak_flops', 'bandwidth'):
    if d['roofline'][key] <= 0:
      raise ValueError(f'bench.json: roofline.{key} must be > 0')
  for i, m in enumerate(d['models']):
    _check_fields(m, _MODEL, f'models[{i}]')
  seen = set()
  for i, r in enumerate(d['results']):
    where = f'results[{i}]'
    _check_fields(r, _RESULT, where)
    _check_fields(r['memory'], _MEMORY, f'{where}.memory')
    _check_fields(r['predicted_speedup_modes'],
                  {m: _NUM for m in (*MODES, 'full_cache')},
                  f'{where}.predicted_speedup_modes')
    if not r['times_s'] or not all(_is(t, _NUM) and t > 0
                                   for t in r['times_s']):
      raise ValueError(f'bench.json: {where}.times_s must be a non-empty '
                       'list of positive seconds')
    for key in ('tokens_per_s', 'median_s', 'speedup'):
      if r[key] <= 0:
        raise ValueError(f'bench.json: {where}.{key} must be > 0')
    for key in _RESULT_OPTIONAL:
      if key in r and not (_is(r[key], _NUM) and r[key] > 0):
        raise ValueError(f'bench.json: {where}.{key} must be a number > 0, '
                         f'got {r[key]!r}')
    _check_optional(r, _RESULT_OPTIONAL_FIELDS, where)
    if r.get('key_layout', 'k') not in ('k', 'kt'):
      raise ValueError(f'bench.json: {where}.key_layout='
                       f'{r["key_layout"]!r}: expected the resolved layout, '
                       "'k' or 'kt'")
    _check_profile(r, profiled, where)
    seen.add((r['k'], r['batch']))
  for k in [1, *d['settings']['ks']]:
    for b in d['settings']['batch_sizes']:
      if (k, b) not in seen:
        raise ValueError(f'bench.json: results has no row for k={k}, '
                         f'batch={b}')
  for i, a in enumerate(d['accelerators']):
    _check_fields(a, _ACCEL, f'accelerators[{i}]')
  _check_fields(d['peer'], _PEER, 'peer')
  for i, p in enumerate(d['peer']['results']):
    _check_fields(p, _PEER_RESULT, f'peer.results[{i}]')


def load_bench_json(path: str) -> dict[str, Any]:
  """Reads and validates a bench.json."""
  with open(path) as f:
    d = json.load(f)
  validate_bench_json(d)
  return d
