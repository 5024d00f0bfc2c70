"""Device mesh, parameter partitioning and host-batch -> global-array glue.

Sharding rules live here, never in the model: the model is written for one
device and `jax.jit` partitions it from the shardings chosen below.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


def make_mesh(mesh_cfg) -> Mesh:
  """1-D mesh over the 'data' axis (size -1 = every device)."""
  n = jax.device_count()
  size = n if mesh_cfg.data == -1 else mesh_cfg.data
  if size < 1 or size > n or n % size:
    raise ValueError(f'mesh.data={mesh_cfg.data} does not fit {n} devices')
  return jax.make_mesh((size,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:size])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def _fsdp_spec(shape, size: int) -> P:
  """Shards the largest axis divisible by the mesh size; else replicates."""
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for axis in order:
    if shape[axis] % size == 0 and shape[axis] >= size:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return P(*spec)
  return P()


def state_shardings(tree, mesh: Mesh, fsdp: bool):
  """Shardings for params / optimizer state: replicated or FSDP-style."""
  size = mesh.shape[DATA]

  def one(x):
    if not fsdp or not hasattr(x, 'shape') or not x.shape:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(x.shape, size))

  return jax.tree.map(one, tree)


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows -> one global array sharded over 'data'."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh),
                                                local_batch)


def check_batch_divisible(batch_size: int, mesh: Mesh):
  size = mesh.shape[DATA]
  if batch_size % size:
    raise ValueError(f'train.batch_size={batch_size} is not divisible by the '
                     f'{size} devices of the data axis')
