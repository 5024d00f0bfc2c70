"""Distillation actually learns, and learns the right joint distribution."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import decode
from kforcing_jax import defaults
from kforcing_jax import distill
from kforcing_jax import model as model_lib
from kforcing_jax import train as train_lib
from tests import helpers

V = 8  # Bigram vocabulary.


def _bigram_table(seed=0):
  rng = np.random.default_rng(seed)
  logits = 1.5 * rng.standard_normal((V, V))
  p = np.exp(logits)
  return p / p.sum(1, keepdims=True)


def _bigram_teacher(cfg, table):
  """Transformer params computing exactly log table[x_t] at position t.

  Attention and MLP outputs are zeroed, so the residual stream is the token
  embedding e_x = one-hot(x); the final LayerNorm maps it back to the
  one-hot (scale = its std, bias = its mean), and the unembedding rows hold
  log-probabilities. The student copies all of it and must learn the rest.
  """
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(np.array, params)  # Writable copies.
  d = cfg.d_model
  emb = np.zeros((V, d), np.float32)
  emb[np.arange(V), np.arange(V)] = 1.0
  params['embed']['embedding'] = emb
  for i in range(cfg.num_layers):
    block = params[f'block_{i}']
    block['attn']['out']['kernel'] *= 0
    block['mlp_out']['kernel'] *= 0
    block['mlp_out']['bias'] *= 0
  std = np.sqrt(1 / d - 1 / d**2 + 1e-6)
  params['final_norm']['scale'] = np.full((d,), std, np.float32)
  params['final_norm']['bias'] = np.full((d,), 1 / d, np.float32)
  unembed = np.zeros((d, V), np.float32)
  unembed[:V] = np.log(table)
  params['unembed']['kernel'] = unembed
  return jax.tree.map(jnp.asarray, params)


def _chain(table, n, length, seed):
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int32)
  out[:, 0] = rng.integers(0, V, n)
  cdf = table.cumsum(1)
  for t in range(1, length):
    u = rng.random(n)
    out[:, t] = np.minimum((cdf[out[:, t - 1]] < u[:, None]).sum(1), V - 1)
  return out


def _config(steps, lr=3e-3):
  c = defaults.base_config()
  c.model.vocab_size, c.model.seq_len = V, 16
  c.train.batch_size, c.train.num_steps = 32, steps
  c.train.lr, c.train.warmup_steps, c.train.schedule = lr, 20, 'constant'
  c.train.b2, c.train.weight_decay = 0.999, 0.0
  c.train.eval_every, c.train.checkpoint_every = 0, 10_000
  c.mesh.data = 1
  return c


def _distill_chain(cfg, teacher, data, workdir, windows, steps):
  prev, prev_cfg = teacher, cfg
  for w in windows:
    stage = distill.Stage(window=w, method='self_forcing',
                          student_cfg=distill.student_config(cfg, w),
                          source_cfg=prev_cfg, num_windows=0)
    task = distill.stage_task(stage, init_from=prev, frozen=prev)
    r = train_lib.train(task, _config(steps), workdir,
                        helpers.ArrayIterator(data, 32))
    prev, prev_cfg = r.state.params, stage.student_cfg
  return prev, prev_cfg


@pytest.mark.slow
def test_student_joint_over_two_tokens_matches_the_bigram(tmp_path):
  cfg = model_lib.ModelConfig(vocab_size=V, seq_len=16, num_layers=2,
                              d_model=32, num_heads=2, mlp_dim=128)
  table = _bigram_table()
  teacher = _bigram_teacher(cfg, table)
  # The constructed teacher really is the bigram.
  probe = _chain(table, 4, 16, seed=5)
  got = jax.nn.softmax(model_lib.Transformer(cfg).apply({'params': teacher},
                                                        probe), -1)
  np.testing.assert_allclose(got, table[probe], atol=1e-4)

  data = _chain(table, 512, 16, seed=1)
  student, scfg = _distill_chain(cfg, teacher, data, str(tmp_path), (1, 2),
                                 steps=400)
  n = 4000
  prompts = np.repeat(np.arange(V), n // V)[:, None]
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (n, 2)))
  out = decode.generate(student, scfg, prompts, max_new_tokens=2, k=2,
                        noise=noise)
  exact = table[:, :, None] * table[None, :, :]  # P(x1|x0) P(x2|x1): x0,x1,x2
  tvs = []
  for x0 in range(V):
    rows = out.tokens[prompts[:, 0] == x0]
    emp = np.zeros((V, V))
    np.add.at(emp, (rows[:, 0], rows[:, 1]), 1)
    emp /= emp.sum()
    tvs.append(0.5 * np.abs(emp - exact[x0]).sum())
  # 500 samples per context over 64 cells: sampling noise alone gives a TV
  # of about 0.1; a student ignoring the noise or the first token scores
  # 0.5-0.9. 0.2 leaves room for the sampling noise plus a small model error.
  print("TV per context:", np.round(tvs, 3))
  assert np.mean(tvs) < 0.2, tvs


def _tiny_config(path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('tiny', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.slow
def test_tiny_student_coupling_accuracy_rises_far_above_untrained(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from kforcing_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from kforcing_jax import commands  # pylint: disable=g-import-not-at-top
  from kforcing_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = _tiny_config(os.path.join(root, 'configs', 'tiny.py'))
  config.train.num_steps = 150
  config.distill.windows = (1,)
  config.distill.steps_per_stage = 150
  workdir = str(tmp_path)
  commands.run_teacher(config, workdir)
  tcfg, teacher, _ = checkpoints.load_params(os.path.join(workdir, 'teacher'))
  stage = distill.Stage(window=1, method='self_forcing',
                        student_cfg=distill.student_config(tcfg, 1),
                        source_cfg=tcfg, num_windows=config.distill.num_windows)
  tokenizer = data_lib.get_tokenizer(config, workdir)
  batches = data_lib.make_eval_batches(config, tokenizer, workdir,
                                       batch_size=16, num_batches=2)

  evaluate = jax.jit(stage.evaluate)  # Op by op it cost seconds per call.

  def accuracy(params):
    hits = [evaluate(params, jnp.asarray(b), teacher)['acc_slot1']
            for b in batches]
    return sum(float(h) for h, _ in hits) / sum(n for _, n in hits)

  untrained, _, _ = distill.transfer_params(
      teacher, model_lib.init_params(stage.student_cfg, jax.random.PRNGKey(0)))
  before = accuracy(untrained)
  commands.run_distill(config, workdir)
  _, student, _ = checkpoints.load_params(os.path.join(workdir, 'student_k1'))
  after = accuracy(student)
  print(f'coupling accuracy: untrained {before:.3f}, distilled {after:.3f}')
  # Untrained, the student ignores u and hits the teacher's sample only when
  # both land on the same likely token (about the teacher's sum of p^2:
  # 2.5% measured). 150 steps of this 2-layer, width-64 student reach ~16%
  # (measured); a student that did not learn u -> F^-1(u) stays near 2.5%.
  assert after > max(4 * before, 0.10), (before, after)
