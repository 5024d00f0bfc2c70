"""torch's intra-op thread count, set for a block and given back after.

torch keeps one process-wide count; the commands that run torch in-process
(the bench's HF peer, the evaluator's training, row_matmuls) set their own,
and a caller importing them should find its torch as it left it. Set it
around a whole timed section, not inside each timed run: a change rebuilds
torch's thread pool.
"""

import contextlib


@contextlib.contextmanager
def torch_threads(torch, n: int):
  """torch (the imported module) on `n` threads inside the block."""
  old = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(old)
