"""Reductions of the unembedding projection that never form (M, V) logits.

* `projected_argmax`: greedy decoding (optionally frequency-penalised).
* `projected_inverse_cdf`: inverse-CDF sampling at a temperature.
* `projected_cross_entropy`: fused projection + cross-entropy (custom VJP).

Each takes `impl`: 'auto' (Pallas on TPU, chunked-XLA on CPU and GPU),
'pallas' (interpret mode automatically on CPU), 'reference' (plain matmul) or
'chunked' (XLA loop over vocab chunks).
"""

from kforcing_jax.kernels._common import KernelImpl
from kforcing_jax.kernels.fused_cross_entropy import projected_cross_entropy
from kforcing_jax.kernels.projected_argmax import projected_argmax
from kforcing_jax.kernels.projected_sampling import projected_inverse_cdf

__all__ = [
    'KernelImpl', 'projected_argmax', 'projected_cross_entropy',
    'projected_inverse_cdf',
]
