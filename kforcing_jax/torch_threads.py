"""Thread counts: the cores this process may use, and torch's intra-op
count set for a block and given back after.

torch keeps one process-wide count; the commands that run torch in-process
(the bench's HF peer, the evaluator's training, row_matmuls) set their own,
and a caller importing them should find its torch as it left it. Set it
around a whole timed section, not inside each timed run: a change rebuilds
torch's thread pool.
"""

import contextlib
import os


def usable_cpu_count() -> int:
  """Cores this process may run on (its affinity mask, where the OS has
  one), which a container or taskset can make fewer than the machine's."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(torch, n: int):
  """torch (the imported module) on `n` threads inside the block."""
  old = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(old)
