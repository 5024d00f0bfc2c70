"""Small shared pieces for tests."""

import numpy as np


class ArrayIterator:
  """Deterministic batch iterator over a fixed array, with resumable state."""

  def __init__(self, data: np.ndarray, batch_size: int):
    self.data, self.batch_size, self.pos = data, batch_size, 0

  def __iter__(self):
    return self

  def __next__(self):
    idx = (self.pos + np.arange(self.batch_size)) % len(self.data)
    self.pos += self.batch_size
    return self.data[idx]

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, state):
    self.pos = state['pos']


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  diffs = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x, np.float64)
                                                 - np.asarray(y)).max()),
                       a, b)
  return max(jax.tree.leaves(diffs))
