"""Progressive self-forcing distillation (docs/METHOD.md) as training `Task`s.

Stage k=1: targets are the frozen AR teacher's inverse-CDF tokens
  y = F_T^-1(u | x_<=t).
Stage k=2m: targets are the frozen window-m student's own rollout, the
  double forward: pass 1 emits y_1..y_m from (x_<=t, u_1..u_m); pass 2 feeds
  y_1..y_m back as tokens at t+1..t+m with noise u_(m+1)..u_2m after them.
  The student emits with its readout (distill.readout, decode.READOUTS):
  argmax (the paper's), a draw from its softmax at
  distill.readout_temperature with the low bits of u, or the median of
  that softmax.
Noise inversion (baseline): targets are the real data tokens, each u drawn
  inside its token's CDF interval under the AR teacher.
Contexts are real training sequences; each sampled window t of a sequence
gets its own fresh noise.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import layouts
from kforcing_jax import model as model_lib
from kforcing_jax import noise as noise_lib
from kforcing_jax import projection
from kforcing_jax import train as train_lib
from kforcing_jax.decode_spec import READOUTS

_BACKBONE_FIELDS = ('vocab_size', 'seq_len', 'num_layers', 'd_model',
                    'num_heads', 'mlp_dim', 'rope_base')


def stage_name(window: int) -> str:
  return f'student_k{window}'


def student_config(base_cfg: model_lib.ModelConfig, window: int):
  """The student with `window` noise slots: `base_cfg`'s backbone and
  noise-encoder fields (the requested config; `check_fit` checks the
  backbone against the teacher's)."""
  return dataclasses.replace(base_cfg, noise_window=window)


def check_fit(teacher_cfg: model_lib.ModelConfig,
              student_cfg: model_lib.ModelConfig):
  """Student and teacher must share the backbone; raises ValueError."""
  diff = [f'{f}: teacher={getattr(teacher_cfg, f)!r} vs '
          f'student={getattr(student_cfg, f)!r}'
          for f in _BACKBONE_FIELDS
          if getattr(teacher_cfg, f) != getattr(student_cfg, f)]
  if diff:
    raise ValueError('student and teacher configs do not fit together: '
                     + '; '.join(diff))
  if not student_cfg.noise_window:
    raise ValueError('the student config has noise_window=0 (no noise slots)')


def check_precision(precision: str) -> None:
  """distill.precision must be one this process can run (float64 needs
  JAX's x64 mode), checked before any training; raises ValueError."""
  try:
    noise_lib.working_dtype(precision)
  except ValueError as e:
    raise ValueError(f'distill.precision={precision!r}: {e}') from None


def transfer_params(source, target):
  """Copies every source leaf whose path and shape match into target.

  Returns (params, copied_paths, new_paths).
  """
  src = {jax.tree_util.keystr(p): v
         for p, v in jax.tree_util.tree_leaves_with_path(source)}
  copied, new = [], []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    if key in src and src[key].shape == leaf.shape:
      copied.append(key)
      return jnp.asarray(src[key], leaf.dtype)
    new.append(key)
    return leaf

  params = jax.tree_util.tree_map_with_path(pick, target)
  return params, copied, new


def sample_windows(rng, batch: int, num_context: int, k: int,
                   num_windows: int):
  """(B, M) context positions t, distinct per row, with t + k <= N - 1.

  num_windows=0 (or more than available) takes every valid t in order.
  """
  valid = num_context - k
  if valid < 1:
    raise ValueError(f'window k={k} needs sequences longer than {k + 1} '
                     f'tokens; got {num_context}')
  if num_windows == 0 or num_windows >= valid:
    return jnp.broadcast_to(jnp.arange(valid, dtype=jnp.int32),
                            (batch, valid))
  scores = jax.random.uniform(rng, (batch, valid))
  return jnp.argsort(scores, axis=1)[:, :num_windows].astype(jnp.int32)


def pf_slot_hidden(cfg, params, tokens_BxN, windows_BxM, u_BxMxK,
                   slot_tokens_BxMxT=None, deterministic=True, rng=None):
  """Student hidden states (B, M, K, D) of the noise slots, training layout."""
  t = 0 if slot_tokens_BxMxT is None else slot_tokens_BxMxT.shape[-1]
  positions, mask = layouts.pf_train_layout(
      windows_BxM, tokens_BxN.shape[1], t + u_BxMxK.shape[-1])
  rngs = None if rng is None else {'dropout': rng}
  return model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxN, slot_tokens_BxMxT, u_BxMxK, positions,
      mask, deterministic, rngs=rngs, method=model_lib.Transformer.pf_hidden)


def pf_slot_logits(cfg, params, tokens_BxN, windows_BxM, u_BxMxK,
                   slot_tokens_BxMxT=None):
  """Student logits (B, M, K, V) in the training layout."""
  h = pf_slot_hidden(cfg, params, tokens_BxN, windows_BxM, u_BxMxK,
                     slot_tokens_BxMxT)
  return projection.logits(h, params['unembed']['kernel'])


def readout_slots(params, h_BxMxKxD, u_BxMxK, impl, readout, precision,
                  temperature):
  """The slots' tokens as the decoder's readout emits them (argmax, or the
  inverse CDF of the softmax at `temperature` at `noise.readout_uniform`)."""
  *lead, d = h_BxMxKxD.shape
  h_MxD = h_BxMxKxD.reshape(-1, d)
  w_DxV = params['unembed']['kernel']
  if readout == 'argmax':
    tokens = projection.argmax(h_MxD, w_DxV, impl)
  else:
    tokens = projection.inverse_cdf(
        h_MxD, w_DxV,
        noise_lib.readout_uniform(readout, u_BxMxK).reshape(-1), impl,
        temperature, precision=precision)
  return tokens.reshape(lead)


def ar_targets(teacher_cfg, teacher_params, tokens_BxN, windows_BxM, u_BxMx1,
               precision='auto', impl='reference', temperature=1.0):
  """Stage k=1: the AR teacher's inverse-CDF token after each window t,
  from its softmax at `temperature`."""
  h = model_lib.Transformer(teacher_cfg).apply(
      {'params': teacher_params}, tokens_BxN,
      method=model_lib.Transformer.hidden)
  h_at_t = jnp.take_along_axis(h, windows_BxM[..., None], axis=1)
  b, m, d = h_at_t.shape
  tokens = projection.inverse_cdf(
      h_at_t.reshape(b * m, d), teacher_params['unembed']['kernel'],
      u_BxMx1.reshape(b * m), impl, temperature, precision=precision)
  return tokens.reshape(b, m, 1)


def self_forcing_targets(prev_cfg, prev_params, tokens_BxN, windows_BxM,
                         u_BxMxK, impl='reference', readout='argmax',
                         precision='auto', temperature=1.0):
  """Stage 2m: the window-m student's double forward, 2m tokens per window,
  each emitted by `readout` (decode.READOUTS; `precision` and
  `temperature` are a sampled or median readout's, as ar_targets')."""
  m = prev_cfg.noise_window
  if u_BxMxK.shape[-1] != 2 * m:
    raise ValueError(f'double forward of a window-{m} model needs {2 * m} '
                     f'noise values per window, got {u_BxMxK.shape[-1]}')
  if readout not in READOUTS:
    raise ValueError(f'readout={readout!r}: expected one of {READOUTS}')
  u_first, u_second = u_BxMxK[..., :m], u_BxMxK[..., m:]
  first = readout_slots(prev_params, pf_slot_hidden(
      prev_cfg, prev_params, tokens_BxN, windows_BxM, u_first), u_first,
                        impl, readout, precision, temperature)
  second = readout_slots(prev_params, pf_slot_hidden(
      prev_cfg, prev_params, tokens_BxN, windows_BxM, u_second,
      slot_tokens_BxMxT=first), u_second, impl, readout, precision,
                         temperature)
  return jnp.concatenate([first, second], -1)


def inversion_targets(rng, teacher_cfg, teacher_params, tokens_BxN,
                      windows_BxM, k):
  """Baseline: data tokens x_(t+1..t+k), u inside each one's CDF interval."""
  logits = model_lib.Transformer(teacher_cfg).apply(
      {'params': teacher_params}, tokens_BxN)
  # Slot i of window t predicts x_(t+1+i) from the teacher at position t+i.
  pos_BxMxK = windows_BxM[..., None] + jnp.arange(k)
  b, m = windows_BxM.shape
  at = jnp.take_along_axis(logits, pos_BxMxK.reshape(b, m * k)[..., None],
                           axis=1)
  targets = jnp.take_along_axis(tokens_BxN, pos_BxMxK.reshape(b, m * k) + 1,
                                axis=1)
  u = noise_lib.sample_u_in_interval(rng, at, targets)
  return u.reshape(b, m, k), targets.reshape(b, m, k).astype(jnp.int32)


def slot_losses(params, h_BxMxKxD, targets_BxMxK, impl):
  """Per-slot cross-entropy and hits (B, M, K), fused projection + loss."""
  *lead, d = h_BxMxKxD.shape
  losses, top = projection.cross_entropy(
      h_BxMxKxD.reshape(-1, d), params['unembed']['kernel'],
      targets_BxMxK.reshape(-1), impl)
  return losses.reshape(lead), top.reshape(lead) == targets_BxMxK


@dataclasses.dataclass(frozen=True)
class Stage:
  """One distillation stage: a student of `window` learning from `source`."""
  window: int
  method: str  # 'self_forcing' | 'noise_inversion'
  student_cfg: model_lib.ModelConfig
  source_cfg: model_lib.ModelConfig  # AR teacher or previous-stage student.
  num_windows: int
  precision: str = 'auto'
  kernel_impl: str = 'auto'  # Vocabulary projection (projection.py).
  teacher_temperature: float = 1.0  # Of an AR source (distill.*).
  readout: str = 'argmax'  # Of a student source (distill.*),
  readout_temperature: float = 1.0  # and its non-argmax readout's.

  def extras(self, rng, tokens_BxN, frozen):
    """Windows, noise and targets for a global batch (device-count free)."""
    b, n = tokens_BxN.shape
    w_rng, u_rng = jax.random.split(rng)
    windows = sample_windows(w_rng, b, n, self.window, self.num_windows)
    if self.method == 'noise_inversion':
      u, targets = inversion_targets(u_rng, self.source_cfg, frozen,
                                     tokens_BxN, windows, self.window)
      return {'windows': windows, 'u': u, 'targets': targets}
    u = jax.random.uniform(u_rng, windows.shape + (self.window,))
    if self.source_cfg.noise_window == 0:
      targets = ar_targets(self.source_cfg, frozen, tokens_BxN, windows, u,
                           self.precision, self.kernel_impl,
                           self.teacher_temperature)
    else:
      targets = self_forcing_targets(self.source_cfg, frozen, tokens_BxN,
                                     windows, u, self.kernel_impl,
                                     self.readout, self.precision,
                                     self.readout_temperature)
    return {'windows': windows, 'u': u, 'targets': targets}

  def loss(self, params, tokens_BxN, extras, rng, frozen):
    del frozen
    h = pf_slot_hidden(self.student_cfg, params, tokens_BxN,
                       extras['windows'], extras['u'], deterministic=False,
                       rng=rng)
    losses, hits = slot_losses(params, h, extras['targets'], self.kernel_impl)
    metrics = {}
    for i in range(self.window):
      metrics[f'loss_slot{i + 1}'] = losses[..., i].mean()
      metrics[f'acc_slot{i + 1}'] = hits[..., i].mean()
    return losses.mean(), metrics

  def evaluate(self, params, tokens_BxN, frozen):
    # Fixed noise: eval numbers are comparable across steps and runs.
    extras = self.extras(jax.random.PRNGKey(1234), tokens_BxN, frozen)
    h = pf_slot_hidden(self.student_cfg, params, tokens_BxN,
                       extras['windows'], extras['u'])
    losses, hits = slot_losses(params, h, extras['targets'], self.kernel_impl)
    n = losses[..., 0].size
    out = {'loss': (losses.mean(-1).sum(), n)}
    for i in range(self.window):
      out[f'acc_slot{i + 1}'] = (hits[..., i].sum(), n)
    return out


def stage_task(stage: Stage, init_from, frozen,
               source: dict | None = None) -> train_lib.Task:
  """Training task of a stage.

  The student starts from `init_from` (matching names and shapes copied);
  `frozen` are the target model's params: an input of every step, never in
  the optimizer state and never differentiated. `source` ({'run', 'step'}
  of the frozen model) goes into the checkpoint meta (train.Task.source).
  """

  def init_params(rng, source):
    fresh = model_lib.init_params(stage.student_cfg, rng)
    params, _, _ = transfer_params(source, fresh)
    return params

  return train_lib.Task(
      name=stage_name(stage.window), model_cfg=stage.student_cfg,
      init_params=init_params, loss_fn=stage.loss, eval_fn=stage.evaluate,
      extras_fn=stage.extras, frozen=frozen, shard_map=True,
      init_source=init_from, source=source)


def describe_transfer(init_from, student_cfg) -> str:
  """Human-readable summary of which parameters are copied vs new."""
  fresh = jax.eval_shape(lambda r: model_lib.init_params(student_cfg, r),
                         jax.random.PRNGKey(0))
  _, copied, new = transfer_params(
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), init_from), fresh)
  groups = sorted({p.split("']")[0].strip("['") for p in new})
  return (f'copied {len(copied)} parameter arrays from the source model; '
          f'new: {len(new)} arrays' + (f' in {groups}' if groups else ''))
