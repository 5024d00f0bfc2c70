"""Statistics of token sequences shared by the evaluation (`eval_metrics.py`:
per sample) and the noise sweep (`noise_sweep.py`: per swept grid)."""

import math

import numpy as np


def unigram_entropy(tokens) -> float:
  """Entropy in nats of the empirical token distribution of one sequence."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size == 0:
    return math.nan
  _, counts = np.unique(tokens, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum()) + 0.0  # One token: 0.0, not -0.0.
