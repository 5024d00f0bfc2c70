"""The peer `bench` compares against: Hugging Face `generate()` with KV cache
on a GPT-2 of the same shape (random weights), when torch and transformers
are installed (the `eval` extra)."""

import time
from typing import Any, Callable

import jax
import numpy as np

from kforcing_jax import bench_settings
from kforcing_jax import model as model_lib
from kforcing_jax import torch_threads


def run_peer(cfg: model_lib.ModelConfig, prompts: dict[int, np.ndarray],
             max_new: int, s: bench_settings.BenchSettings,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Times HF GPT2LMHeadModel.generate of the same shape, if installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'available': False, 'library': '', 'results': [],
            'note': f'peer skipped: {e.name} is not installed (pip install '
                    '".[eval]", i.e. torch and transformers)'}
  threads = torch_threads.usable_cpu_count()
  with torch_threads.torch_threads(torch, threads):
    return _run_peer(torch, transformers, threads, cfg, prompts, max_new, s,
                     log)


def _run_peer(torch, transformers, threads, cfg, prompts, max_new, s, log):
  """run_peer's timing, with torch already on `threads` threads."""
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
  sample = s.readout != 'argmax'  # Our AR teacher samples then.
  sampling = (dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
              if sample else dict(do_sample=False))
  results = []
  with torch.inference_mode():
    for batch, prompt in sorted(prompts.items()):
      ids = torch.as_tensor(prompt, dtype=torch.long, device=device)

      def gen(ids=ids):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new, min_new_tokens=max_new,
            # Like for like with our AR: sampling (full softmax, T=1)
            # under bench.readout='sample' or 'median', else greedy.
            use_cache=True, **sampling)

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
                  f"weights, {'sampling' if sample else 'greedy'} generate "
                  'with use_cache, no eos'}
