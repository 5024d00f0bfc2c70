"""Causal Transformer shared by the AR teacher and the K-Forcing student.

Pre-norm blocks, RoPE, GELU MLP, untied input/output embeddings. Every call
shape goes through `Transformer.backbone`, which takes an explicit attention
mask and explicit RoPE positions, so the same weights serve:
  * the full causal forward (teacher training, `__call__`),
  * the push-forward training layout [context | windows of noise slots]
    (`pf_hidden`, built in `layouts.py`),
  * cached decoding steps of any number of new positions (`cached_step`).
Parameters are a plain pytree; `apply` has no hidden state.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import noise as noise_lib
from kforcing_jax.kernels import decode_attention

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# ModelConfig fields that only a student (noise_window > 0) reads: they are
# not part of an AR teacher, so a teacher checkpoint does not differ by them.
NOISE_FIELDS = ('noise_mlp_dim', 'noise_scale', 'noise_feature_dim')


def as_int(value, name: str, minimum: int) -> int:
  """`value` as a Python int >= minimum (numpy ints and concrete 0-d jax
  ints accepted, bools and floats not); raises ValueError naming `name`
  and the value."""
  if (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
      and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer)):
    value = int(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise ValueError(f'{name} must be an int, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name}={int(value)} must be >= {minimum}')
  return int(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyperparameters; `noise_window > 0` makes it a K-Forcing student."""
  vocab_size: int
  seq_len: int
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  rope_base: float = 10000.0
  noise_window: int = 0
  noise_mlp_dim: int = 0
  noise_scale: float = 1000.0
  noise_feature_dim: int = 256

  def __post_init__(self):
    positive = ('vocab_size', 'seq_len', 'num_layers', 'd_model', 'num_heads',
                'mlp_dim')
    for name in positive:
      # Frozen: normalise numpy ints to int so equal configs hash equal.
      object.__setattr__(self, name,
                         as_int(getattr(self, name), f'model.{name}', 1))
    object.__setattr__(self, 'noise_window',
                       as_int(self.noise_window, 'model.noise_window', 0))
    object.__setattr__(self, 'noise_mlp_dim',
                       as_int(self.noise_mlp_dim, 'model.noise_mlp_dim', 0))
    object.__setattr__(self, 'noise_feature_dim', as_int(
        self.noise_feature_dim, 'model.noise_feature_dim', 2))
    if self.noise_feature_dim % 2:
      raise ValueError(f'model.noise_feature_dim={self.noise_feature_dim} '
                       'must be even (cos and sin halves)')
    if self.d_model % self.num_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must divide '
                       f'model.d_model={self.d_model}')
    if self.head_dim % 2:
      raise ValueError(f'head dim d_model/num_heads={self.head_dim} must be '
                       'even for RoPE')
    if self.dtype not in _DTYPES:
      raise ValueError(f'model.dtype={self.dtype!r}; expected one of '
                       f'{sorted(_DTYPES)}')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'model.dropout_rate={self.dropout_rate} not in [0, 1)')
    for name in ('rope_base', 'noise_scale'):
      if not 0 < getattr(self, name) < float('inf'):
        raise ValueError(f'model.{name}={getattr(self, name)} must be finite '
                         'and > 0')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model_cfg, noise_window: int = 0) -> 'ModelConfig':
    """Builds from the `config.model` ConfigDict."""
    fields = {f.name for f in dataclasses.fields(cls)} - {'noise_window'}
    return cls(**{k: model_cfg[k] for k in fields if k in model_cfg},
               noise_window=noise_window)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def rotate(x_BxLxHxK, cos_BxLxK, sin_BxLxK):
  """Rotary embedding (rotate-half form) given the angles' cos and sin."""
  cos, sin = cos_BxLxK[:, :, None, :], sin_BxLxK[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def rope_span(cfg: 'ModelConfig') -> tuple[int, int]:
  """[lo, hi): the positions `rope_tables` covers exactly. Left padding
  gives positions down to 1 - seq_len; training layouts (the self-forcing
  double forward included) stay below seq_len, and a decode's last step
  passes it by at most k - 2 slots; the margin above seq_len is
  4 * noise_window (4 for a teacher). `DecodeSpec` and `hidden` refuse
  longer inputs."""
  return -cfg.seq_len, cfg.seq_len + 4 * max(cfg.noise_window, 1)


@functools.lru_cache(maxsize=16)
def _rope_table(lo: int, hi: int, head_dim: int, base: float):
  half = head_dim // 2
  freqs = float(base) ** (-np.arange(half, dtype=np.float64) / half)
  angles = np.arange(lo, hi, dtype=np.float64)[:, None] * freqs
  tables = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  for table in tables:  # Cached and shared: never to be written.
    table.flags.writeable = False
  return tables


def rope_tables(cfg: 'ModelConfig', positions_BxL):
  """(cos, sin) of the rotary angles at `positions`, each
  (B, L, head_dim // 2) float32, looked up in a table made once on the
  host (exact for positions in `rope_span`; outside it, clipped to its
  ends). Computed from the positions in the pass, sin and cos were fused
  by XLA:CPU into every layer's rotation and recomputed per head and per
  layer. With the table, k=4 decoding on the demo model gets 16-18% more
  tokens/s, AR 9-17% (means of the README's A/B). Its values differ from
  the float32 computation by up to about 4e-6."""
  lo, hi = rope_span(cfg)
  cos, sin = _rope_table(lo, hi, cfg.head_dim, float(cfg.rope_base))
  index = jnp.clip(positions_BxL - lo, 0, hi - lo - 1)
  return jnp.asarray(cos)[index], jnp.asarray(sin)[index]


# KV-cache entries and their axes (n = batch * heads, batch-major; s slot;
# k head dim). The cache is heads-major so attention's dots read it in place
# (a (B, S, H, K) cache is transposed, i.e. copied, every step), and batch
# and heads share one axis: with a (B, H, ...) cache at batch 1, XLA:CPU
# copied every cache buffer several times per step (AR at batch 1 is about
# 20% faster without). Keys are 'k' or, transposed, 'kt': with several
# queries per step (push-forward) the scores dot is about 2x faster on CPU
# from 'kt'; a single AR query is slightly faster from 'k'; on a GPU 'k'
# is faster for both. `decode.key_layout` picks.
CACHE_LAYOUTS = {'k': 'nsk', 'kt': 'nks', 'v': 'nsk'}


def _heads_major(x_BxLxHxK, layout: str):
  """(B, L, H, K) -> the cache layout `layout` ('nsk' or 'nks')."""
  b, _, h, _ = x_BxLxHxK.shape
  order = 'bhsk' if layout == 'nsk' else 'bhks'
  x = jnp.einsum(f'bshk->{order}', x_BxLxHxK)
  return x.reshape((b * h,) + x.shape[2:])


# Cached attention: 'xla' (dots and softmax, below) or 'pallas' (one GPU
# kernel per layer: kernels/decode_attention.py; key layout 'k' only).
ATTENTION_IMPLS = ('xla', 'pallas')


class Attention(nn.Module):
  cfg: ModelConfig
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, x_BxLxD, rope, mask_BxLxS, kv_cache=None,
               cache_index=None, deterministic=True, num_out=None):
    """Masked attention; with `kv_cache`, new K/V are written at cache_index.

    `rope`: (cos, sin) of the L positions, from `rope_tables`.

    `num_out` (static): only the last num_out positions query (all L still
    give keys and values); the output is (B, num_out, D).

    Without a cache the keys are the L inputs and the mask is (B, L, L).
    With a cache {'k' or 'kt', 'v'} (CACHE_LAYOUTS) the L new keys are
    written at slots [cache_index, cache_index + L) first and queries attend
    over all S slots, so the mask is (B, L, S); the caller's mask decides
    which slots count.
    """
    cfg = self.cfg
    dense = lambda name: nn.DenseGeneral(
        (cfg.num_heads, cfg.head_dim), use_bias=False, dtype=cfg.compute_dtype,
        name=name)
    if num_out is not None:
      x_q, q_rope = x_BxLxD[:, -num_out:], [t[:, -num_out:] for t in rope]
      mask_BxLxS = mask_BxLxS[:, -num_out:]
    else:
      x_q, q_rope = x_BxLxD, rope
    q = rotate(dense('query')(x_q), *q_rope)
    k = rotate(dense('key')(x_BxLxD), *rope)
    v = dense('value')(x_BxLxD)
    new_cache = None
    b, lq, h, hd = q.shape
    if kv_cache is not None:
      # New K/V go into the cache in its layout (CACHE_LAYOUTS), at slot
      # cache_index along its 's' axis.
      key_name = 'kt' if 'kt' in kv_cache else 'k'
      keys, values = CACHE_LAYOUTS[key_name], CACHE_LAYOUTS['v']
      new_cache = {}
      for name, x in ((key_name, k), ('v', v)):
        layout = CACHE_LAYOUTS[name]
        if kv_cache[name].ndim != 3:
          raise ValueError(
              f'KV cache {name!r} has shape {kv_cache[name].shape}; expected '
              f'axes {layout!r} (n = batch * heads): build it with '
              'decode.init_cache')
        x = _heads_major(x, layout).astype(kv_cache[name].dtype)
        # int32 indices, also under jax_enable_x64 (literal 0 is int64).
        start = [jnp.int32(0)] * 3
        start[layout.index('s')] = jnp.asarray(cache_index, jnp.int32)
        new_cache[name] = jax.lax.dynamic_update_slice(kv_cache[name], x,
                                                       start)
      # The kernel holds a pass's queries in one block per (row, head): a
      # decode step's few. A long prompt's prefill attends with XLA.
      if (self.attention_impl == 'pallas'
          and lq <= decode_attention.MAX_QUERIES):
        if key_name != 'k':
          raise ValueError("attention_impl='pallas' reads keys in layout "
                           f"'k', not {key_name!r}")
        out = decode_attention.cached_attention(q, new_cache['k'],
                                                new_cache['v'], mask_BxLxS)
        return self._project_out(out, deterministic), new_cache
      k = new_cache[key_name].astype(q.dtype)
      v = new_cache['v'].astype(q.dtype)
      q = jnp.einsum('blhk->bhlk', q).reshape(b * h, lq, hd)
      queries, out_axes = 'nlk', 'nls'
    else:
      keys = values = 'bshk'
      queries, out_axes = 'blhk', 'bhls'
    # Dots, also for a decode step's few queries. Tried on one H100 (LM1B
    # size, k=4): both contractions as float32 products summed, which XLA
    # turns into reductions, ran 41-42k tok/s at batch 8 against 53-57k
    # with dots; at batch 64 XLA fused them into one kernel per layer that
    # recomputed the scores per output (22k tok/s, a fifth of AR's).
    scores = jnp.einsum(f'{queries},{keys}->{out_axes}', q, k,
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, lq, -1) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.where(mask_BxLxS[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
    # Heads-major output, then a (small) transpose: 'bhls,bhsk->blhk' makes
    # XLA's CPU dot several times slower for multi-query steps.
    if kv_cache is not None:
      out = jnp.einsum(f'nls,{values}->nlk', probs.reshape(b * h, lq, -1), v)
    else:
      out = jnp.einsum(f'bhls,{values}->bhlk', probs, v)
    out = jnp.swapaxes(out.reshape(b, h, lq, hd), 1, 2)
    return self._project_out(out, deterministic), new_cache

  def _project_out(self, out_BxLxHxK, deterministic):
    cfg = self.cfg
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False,
                          dtype=cfg.compute_dtype, name='out')(out_BxLxHxK)
    return nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)


class Block(nn.Module):
  cfg: ModelConfig
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, x, rope, mask, kv_cache=None, cache_index=None,
               deterministic=True, num_out=None):
    """`rope`: (cos, sin) from `rope_tables`. `num_out` (static): compute
    only the last num_out positions' output (every position still writes
    K/V); see Attention."""
    cfg = self.cfg
    h = nn.LayerNorm(dtype=cfg.compute_dtype, name='attn_norm')(x)
    h, new_cache = Attention(cfg, self.attention_impl, name='attn')(
        h, rope, mask, kv_cache, cache_index, deterministic, num_out)
    if num_out is not None:
      x = x[:, -num_out:]
    x = x + h
    h = nn.LayerNorm(dtype=cfg.compute_dtype, name='mlp_norm')(x)
    h = nn.Dense(cfg.mlp_dim, dtype=cfg.compute_dtype, name='mlp_in')(h)
    h = nn.gelu(h)
    h = nn.Dense(cfg.d_model, dtype=cfg.compute_dtype, name='mlp_out')(h)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return x + h, new_cache


def causal_mask(length: int):
  """(1, L, L) lower-triangular boolean mask."""
  return jnp.tril(jnp.ones((length, length), bool))[None]


class Transformer(nn.Module):
  """Teacher (noise_window == 0) or student (noise_window > 0) Transformer.

  `attention_impl`: how cached (decode) steps attend; see ATTENTION_IMPLS.
  """
  cfg: ModelConfig
  attention_impl: str = 'xla'

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                          embedding_init=nn.initializers.normal(0.02),
                          name='embed')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; expected '
                       f'one of {ATTENTION_IMPLS}')
    self.blocks = [Block(cfg, self.attention_impl, name=f'block_{i}')
                   for i in range(cfg.num_layers)]
    self.final_norm = nn.LayerNorm(dtype=cfg.compute_dtype, name='final_norm')
    # dtype=None: the hidden state and the float32 kernel promote to
    # float32, as in projection.logits (decoding, the losses): one set of
    # logits per model, also in bfloat16.
    self.unembed = nn.Dense(cfg.vocab_size, use_bias=False, dtype=None,
                            name='unembed')
    if cfg.noise_window:
      self.noise_encoder = noise_lib.NoiseEncoder(
          d_model=cfg.d_model, mlp_dim=cfg.noise_mlp_dim,
          feature_dim=cfg.noise_feature_dim,
          scale=cfg.noise_scale, dtype=cfg.compute_dtype,
          name='noise_encoder')

  def embed_tokens(self, tokens_BxL):
    return self.embed(tokens_BxL).astype(self.cfg.compute_dtype)

  def embed_noise(self, u):
    """Noise slots: one d_model vector per uniform u (student only)."""
    if not self.cfg.noise_window:
      raise ValueError('this model has no noise encoder (noise_window=0): '
                       'it is an AR teacher, not a K-Forcing student')
    return self.noise_encoder(u).astype(self.cfg.compute_dtype)

  def backbone(self, x_BxLxD, positions_BxL, mask, kv_caches=None,
               cache_index=None, deterministic=True, num_out=None):
    """Blocks + final norm. Returns (hidden_BxLxD, new_kv_caches or None).

    `num_out` (static): only the last num_out positions' hidden states are
    wanted, so the last block computes just those (a decode step reads only
    its emitting positions); hidden is then (B, num_out, D).
    """
    new_caches = []
    last = len(self.blocks) - 1
    rope = rope_tables(self.cfg, positions_BxL)  # Shared by every layer.
    for i, block in enumerate(self.blocks):
      cache = None if kv_caches is None else kv_caches[i]
      x_BxLxD, new_cache = block(x_BxLxD, rope, mask, cache,
                                 cache_index, deterministic,
                                 num_out if i == last else None)
      new_caches.append(new_cache)
    h = self.final_norm(x_BxLxD)
    return h, (None if kv_caches is None else tuple(new_caches))

  def project(self, h_BxLxD):
    """Unembedding to float32 logits."""
    return self.unembed(h_BxLxD).astype(jnp.float32)

  def hidden(self, tokens_BxL, deterministic=True):
    """Full causal forward up to the final norm: (B, L, D)."""
    length = tokens_BxL.shape[1]
    hi = rope_span(self.cfg)[1]
    if length > hi:
      raise ValueError(f'{length} tokens exceed the {hi} positions this model '
                       f'supports (seq_len={self.cfg.seq_len})')
    positions = jnp.broadcast_to(jnp.arange(length), tokens_BxL.shape)
    h, _ = self.backbone(self.embed_tokens(tokens_BxL), positions,
                         causal_mask(length), deterministic=deterministic)
    return h

  def __call__(self, tokens_BxL, deterministic=True):
    """Full causal forward: next-token logits (B, L, V)."""
    return self.project(self.hidden(tokens_BxL, deterministic))

  def pf_hidden(self, tokens_BxN, slot_tokens_BxMxT, u_BxMxK, positions_BxL,
                mask_BxLxL, deterministic=True):
    """Push-forward training layout: hidden states of the M*K noise slots.

    The input is [N context tokens | M windows of (T tokens, K noise slots)];
    positions and the staircase mask come from `layouts.pf_train_layout`
    with window size T+K. T=0 is the plain student layout; T=m feeds the
    m tokens a previous stage emitted, which is the second pass of the
    self-forcing double forward. Returns (B, M, K, D).
    """
    b, m, k = u_BxMxK.shape
    window = self.embed_noise(u_BxMxK)
    if slot_tokens_BxMxT is not None and slot_tokens_BxMxT.shape[-1]:
      window = jnp.concatenate(
          [self.embed_tokens(slot_tokens_BxMxT), window], axis=2)
    t = window.shape[2] - k
    x = jnp.concatenate([self.embed_tokens(tokens_BxN),
                         window.reshape(b, m * (t + k), -1)], axis=1)
    # The context rows' outputs are never read: the last block skips them.
    h, _ = self.backbone(x, positions_BxL, mask_BxLxL,
                         deterministic=deterministic, num_out=m * (t + k))
    return h.reshape(b, m, t + k, -1)[:, :, t:]

  def cached_step(self, tokens_BxT, u_BxK, positions_BxL, mask_BxLxS,
                  kv_caches, cache_index, num_out=None, noise_x_BxKxD=None):
    """One decoding pass over [T tokens | K noise slots] with a KV cache.

    T or K may be zero (AR: K=0; first push-forward step: T=0). K/V of all
    T+K positions are written at slots [cache_index, cache_index+T+K); the
    caller advances its index by T only, so noise-slot K/V are never part of
    the valid cache and the next step's tokens overwrite them.
    `num_out` (static): return only the last num_out hidden states, which
    the last block then computes alone (see `backbone`).
    `noise_x_BxKxD`: the noise slots already embedded (`embed_noise`), in
    place of u_BxK; the noise encoder reads only u, so a decode loop embeds
    all its noise in one pass before the loop instead of once per step.
    Returns (hidden_BxLxD or hidden_BxNUM_OUTxD, new_kv_caches).
    """
    parts = []
    if tokens_BxT is not None and tokens_BxT.shape[1]:
      parts.append(self.embed_tokens(tokens_BxT))
    if noise_x_BxKxD is not None:
      parts.append(noise_x_BxKxD.astype(self.cfg.compute_dtype))
    elif u_BxK is not None and u_BxK.shape[1]:
      parts.append(self.embed_noise(u_BxK))
    x = jnp.concatenate(parts, axis=1)
    return self.backbone(x, positions_BxL, mask_BxLxS, kv_caches, cache_index,
                         num_out=num_out)

  def init_all(self, tokens_BxN, u_BxMxK, positions_BxL, mask_BxLxL):
    """Touches every parameter (used to initialise students)."""
    h = self.pf_hidden(tokens_BxN, None, u_BxMxK, positions_BxL, mask_BxLxL)
    return self.project(h)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, rng):
  """Initialises a parameter pytree for a teacher or a student.

  Jitted: run op by op, flax's init compiles every op of the forward pass
  on its own (5 s for a 2-layer toy model on a 2-core CPU)."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  if not cfg.noise_window:
    return model.init(rng, tokens)['params']
  from kforcing_jax import layouts  # pylint: disable=g-import-not-at-top
  u = jnp.zeros((1, 4, cfg.noise_window), jnp.float32)
  positions, mask = layouts.pf_train_layout(jnp.arange(4)[None], 4,
                                            cfg.noise_window)
  return model.init(rng, tokens, u, positions, mask,
                    method=Transformer.init_all)['params']


# The block parameters each layer casts to compute_dtype before use (flax's
# Dense/DenseGeneral promote kernel and bias to `dtype`). LayerNorms are
# left out: they mix their float32 scale into float32 statistics.
_CAST_IN_LAYER = ('attn/query', 'attn/key', 'attn/value', 'attn/out',
                  'mlp_in', 'mlp_out')


def compute_params(cfg: ModelConfig, params):
  """`params` with the block weights already in cfg.compute_dtype.

  In a bfloat16 model the layers cast their float32 weights on every call;
  inside a decode loop XLA does that every step (on an H100, LM1B size,
  batch 8: 72 converts per step, 0.24 of the 0.64 ms of kernel time in a
  traced AR step). Cast once before the loop instead: the numbers are the
  same, since a layer's own cast of an already-cast weight changes nothing.
  Float32 models are returned as they are. Leaves outside the blocks
  (embedding, unembedding, norms, noise encoder) stay as stored.
  """
  dtype = cfg.compute_dtype
  if dtype == jnp.float32:
    return params

  def cast(path, leaf):
    name = _path_name(path)
    module = name.split('/', 1)[-1].rsplit('/', 1)[0]
    if name.startswith('block_') and module in _CAST_IN_LAYER:
      return leaf.astype(dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, params)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


@functools.lru_cache(maxsize=32)
def abstract_params(cfg: ModelConfig):
  """`cfg`'s parameter tree as jax.ShapeDtypeStructs (traced, no compute)."""
  return jax.eval_shape(functools.partial(init_params, cfg),
                        jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{'/'-joined parameter path: shape} of `cfg`'s model (traced, no
  compute)."""
  return {_path_name(path): tuple(leaf.shape) for path, leaf in
          jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}


def _path_name(path) -> str:
  return '/'.join(str(getattr(p, 'key', p)) for p in path)


def check_params(cfg: ModelConfig, params) -> None:
  """Raises ValueError unless `params` has exactly the parameters (names
  and shapes) of `cfg`'s model: params of another config (more layers, a
  student's under a teacher config) would otherwise decode silently."""
  expected = param_shapes(cfg)
  leaves = {_path_name(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  got = {name: tuple(np.shape(leaf)) for name, leaf in leaves.items()}
  kind = f'student (noise_window={cfg.noise_window})' if cfg.noise_window \
      else 'teacher'
  missing = sorted(expected.keys() - got.keys())
  if missing and isinstance(params, dict) and set(params) == {'params'}:
    raise ValueError("params is a {'params': ...} variables dict; pass "
                     "params['params'] (load_params returns it unwrapped)")
  if missing:
    raise ValueError(f'params lack {missing[0]!r}, which the {kind} config '
                     'has; are they from another config?')
  extra = sorted(got.keys() - expected.keys())
  if extra:
    raise ValueError(f'params have {extra[0]!r}, which the {kind} config '
                     'does not; are they from another config?')
  for name in sorted(expected):
    if got[name] != expected[name]:
      raise ValueError(f'params {name!r} has shape {got[name]}; the config '
                       f'gives {expected[name]}')
  for name, leaf in leaves.items():
    # An int array of the right shape (a cast gone wrong) decodes garbage.
    dtype = leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f'params {name!r} has dtype {dtype}; parameters are '
                       'floats')
