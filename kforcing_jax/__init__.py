"""K-Forcing in JAX: AR teacher, self-forcing distillation, k-token decoding.

Public API:
  generate(params, cfg, prompts, *, max_new_tokens, k=1, ...)  -> GenerateOutput
  GenerateOutput(tokens, lengths)                              (generate's result)
  ModelConfig, Transformer, init_params, compute_params       (model)
  DecodeSpec, DecodeState, pad_prompts, init_cache, prefill,
  decode_step, decode_loop                                     (step-level decoding)
  load_params(run_dir, use_ema=True) -> (cfg, params, meta)    (checkpoints)
"""

from kforcing_jax.checkpoints import load_params
from kforcing_jax.decode import DecodeSpec
from kforcing_jax.decode import DecodeState
from kforcing_jax.decode import GenerateOutput
from kforcing_jax.decode import decode_loop
from kforcing_jax.decode import decode_step
from kforcing_jax.decode import generate
from kforcing_jax.decode import init_cache
from kforcing_jax.decode import pad_prompts
from kforcing_jax.decode import prefill
from kforcing_jax.model import ModelConfig
from kforcing_jax.model import Transformer
from kforcing_jax.model import compute_params
from kforcing_jax.model import init_params

__all__ = [
    'DecodeSpec', 'DecodeState', 'GenerateOutput', 'ModelConfig',
    'Transformer', 'compute_params', 'decode_loop', 'decode_step',
    'generate', 'init_cache', 'init_params', 'load_params', 'pad_prompts',
    'prefill',
]
