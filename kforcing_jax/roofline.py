"""Roofline model of a decode: the speedup a push-forward decode can reach.

`bench` predicts each measured speedup with it, from this machine's measured
matmul peak and copy bandwidth (`measure_peak_flops`, `measure_bandwidth`)
and from datasheet numbers for named accelerators (`ACCELERATORS`).

The cost of one cached forward pass over q positions per row, B rows,
of which e rows per row are emitting (AR step: q=1, e=1; push-forward step:
q=2k (k tokens + k noise slots), e=k; prefill: q=P (+k), e=1 (k)), with S
cache slots in attention, as three parts:
  weights:   FLOPs 2 * (n_dense - n_emit) * B*q + 2 * n_emit * B*e;
             bytes n_dense * dense_bytes + embedding (or noise-slot) rows.
  attention: FLOPs 4 * d_model * B*S * ((layers - 1) * q + e);
             bytes 2 * layers * d_model * kv_bytes * B * (S read + q written).
  unembed:   FLOPs 2 * d_model * V * B*e; bytes d_model * V * weight_bytes
             + float32 logits written and read back (2 * 4 * B*e*V).
n_dense is every parameter of the blocks and the final norm (attention and
MLP projections, biases, norms): not the embedding, unembedding, noise
encoder. The last block computes only the emitting rows' outputs
(`num_out`): every row still writes its keys and values, but its query,
output projection, MLP, MLP norm and the final norm (n_emit parameters) and
its attention run for the e emitting rows only.
S is what the decode's attention reads: every slot of the cache it runs
with, valid or not. `decode_loop` grows its cache in blocks of
`decode.CACHE_BLOCK` slots (`decode.cache_segments`), so S is the size of
the segment a pass runs in, and each growth copies the cache once
(`grow_bytes`; 'full_cache': the whole cache every pass, never grown).
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
"""

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import decode
from kforcing_jax import model as model_lib

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


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the roofline needs to know about a model."""
  num_layers: int
  d_model: int
  vocab_size: int
  dense_params: int  # Parameters of the blocks and final norm.
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
  # Of dense_params, those applied at emitting rows only (`emit_params`).
  emit_params: int = 0

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
               dense_bytes=_bytes_per_param(dense), cast_bytes=cast_bytes,
               emit_params=emit_params(cfg))


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


def emit_params(cfg: model_lib.ModelConfig) -> int:
  """Of `dense_params`, those only the emitting rows meet: the last
  block's query and output projections, MLP and MLP norm, and the final
  norm (`Attention` and `Block` with num_out)."""
  d, m = cfg.d_model, cfg.mlp_dim
  return 2 * d * d + 2 * d * m + m + d + 2 * d + 2 * d


@dataclasses.dataclass(frozen=True)
class Pass:
  """One cached forward pass of a decode: per row, at cache slot `index`."""
  index: int  # Valid cached slots before the pass.
  tokens: int  # Token positions fed.
  noise: int  # Noise-slot positions fed.
  emit: int  # Emitting rows: those projected to logits.
  slots: int  # Cache slots attention reads (valid or not).


def decode_passes(prompt_len: int, k: int, num_steps: int, student: bool,
                  cache_block: int = decode.CACHE_BLOCK) -> list[Pass]:
  """The passes `decode.decode_loop` makes: prefill, then num_steps-1
  steps, each reading the cache of its segment (`decode.cache_segments`)."""
  segments = decode.cache_segments(prompt_len, k, num_steps, cache_block)
  return _passes(prompt_len, k, num_steps, student, segments)


def _passes(prompt_len: int, k: int, num_steps: int, student: bool,
            segments: list[tuple[int, int]]) -> list[Pass]:
  noise = k if student else 0

  def slots(step):  # Prefill is step 0, in the first segment.
    return next(size for size, end in segments if step < end)

  passes = [Pass(0, prompt_len, noise, k, slots(0))]
  for step in range(1, num_steps):
    passes.append(Pass(prompt_len + (step - 1) * k, k, noise, k,
                       slots(step)))
  return passes


def pass_costs(shape: ModelShape, batch: int, p: Pass,
               cache_size: int | None = None) -> dict[str, tuple[float, float]]:
  """{part: (FLOPs, bytes)} of one pass; see the module docstring.

  cache_size: if given, attention reads all these slots (decode.py with
  DecodeSpec.cache_block=0) instead of the pass's `slots`.
  """
  q = p.tokens + p.noise
  d, layers = shape.d_model, shape.num_layers
  slots = cache_size if cache_size else p.slots
  w_flops = 2.0 * batch * ((shape.dense_params - shape.emit_params) * q
                           + shape.emit_params * p.emit)
  w_bytes = shape.dense_params * shape.dense_bytes
  w_bytes += batch * p.tokens * d * shape.weight_bytes  # Embedding rows.
  # The noise slots' rows, embedded before the loop in the compute dtype
  # (that of the KV cache).
  w_bytes += batch * p.noise * d * shape.kv_bytes
  a_flops = 4.0 * d * batch * slots * ((layers - 1) * q + p.emit)
  a_bytes = 2.0 * layers * d * shape.kv_bytes * batch * (slots + q)
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
  """{part: (FLOPs, bytes)} of each pass of a decode, then of each copy
  that grows its cache to the next segment, then (students) of the noise
  encoder's one pass over all of its noise, then (below float32) of the
  one cast of the block weights."""
  steps = -(-max_new // k)
  cache_size = (decode.full_cache_size(prompt_len, steps, k) if full_cache
                else None)
  segments = decode.cache_segments(prompt_len, k, steps, decode.CACHE_BLOCK)
  out = [pass_costs(shape, batch, p, cache_size)
         for p in _passes(prompt_len, k, steps, k > 1, segments)]
  if not full_cache:
    for (old, _), (new, _) in zip(segments, segments[1:]):
      out.append({'grow': (0.0, grow_bytes(shape, batch, old, new))})
  if k > 1:
    out.append({'noise': noise_encoder_costs(shape, batch, steps * k)})
  if shape.cast_bytes:
    out.append({'cast': (0.0, float(shape.cast_bytes))})
  return out


def grow_bytes(shape: ModelShape, batch: int, old: int, new: int) -> float:
  """Bytes of `decode.grow_cache` from `old` to `new` slots: every
  layer's keys and values read at the old size, written at the new."""
  return (2.0 * shape.num_layers * shape.d_model * shape.kv_bytes * batch
          * (old + new))


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


def ar_step_bound(shape: ModelShape, batch: int, prompt_len: int,
                  max_new: int, peak_flops: float, bandwidth: float) -> str:
  """'compute' or 'memory': which limit sets the middle step of an AR
  decode of max_new tokens (the pass `decode_passes` gives it)."""
  passes = decode_passes(prompt_len, 1, max_new, student=False)
  costs = pass_costs(shape, batch, passes[len(passes) // 2])
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


def predictions(ar: ModelShape, pf: ModelShape, batch: int, k: int,
                prompt_len: int, max_new: int, peak_flops: float,
                bandwidth: float) -> dict[str, float]:
  """The predicted speedup in every mode, and 'max' over the full cache."""
  args = (ar, pf, batch, prompt_len, k, max_new, peak_flops, bandwidth)
  out = {mode: predicted_speedup(*args, mode=mode) for mode in MODES}
  out['full_cache'] = predicted_speedup(*args, mode='max', full_cache=True)
  return out


def accelerator_predictions(cfg: model_lib.ModelConfig,
                            batch_sizes: Sequence[int], ks: Sequence[int],
                            prefix_len: int,
                            max_new: int) -> list[dict[str, Any]]:
  """Datasheet roofline ('max') for the LM1B model and this config, bf16;
  no LM1B rows for a prefix that leaves it no new token."""
  rows = []
  models = (('lm1b', LM1B_MODEL, LM1B_MODEL.seq_len - prefix_len),
            ('config', dataclasses.replace(cfg, dtype='bfloat16'), max_new))
  models = tuple(m for m in models if m[2] > 0)
  for name, peak, bw in ACCELERATORS:
    for label, mcfg, new in models:
      ar = ModelShape.of(mcfg)
      pf = ModelShape.of(dataclasses.replace(mcfg, noise_window=max(ks)))
      for batch in batch_sizes:
        bound = ar_step_bound(ar, batch, prefix_len, new, peak, bw)
        for k in ks:
          rows.append({
              'name': name, 'model': label, 'peak_flops': peak,
              'bandwidth': bw, 'batch': batch, 'k': k,
              'predicted_speedup': predicted_speedup(
                  ar, pf, batch, prefix_len, k, new, peak, bw, 'max'),
              'ar_step_bound': bound})
  return rows
