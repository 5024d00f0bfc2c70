"""RoPE positions and attention masks for every call shape of the model.

Kept apart from the model so the masks can be tested on their own and the
train/decode layouts are visibly the same rule:
  * a noise slot of window t predicts token t+1+i and carries RoPE position
    t+1+i;
  * it sees context <= t and the slots of its own window up to itself.
"""

import jax.numpy as jnp


def pf_train_layout(windows_BxM, num_context: int, k: int):
  """Positions and staircase mask for [N context | M windows of k slots].

  Args:
    windows_BxM: int array, the context position t of each window (the slots
      of window t predict tokens t+1..t+k). All N positions: arange(N).
    num_context: N, the number of context tokens.
    k: slots per window.
  Returns:
    positions_BxL (L = N + M*k) and mask_BxLxL (query, key) booleans.
  """
  windows_BxM = jnp.asarray(windows_BxM, jnp.int32)
  b, m = windows_BxM.shape
  n = num_context
  idx_L = jnp.arange(n + m * k)
  is_ctx_L = idx_L < n
  slot_L = jnp.maximum(idx_L - n, 0)
  win_L = slot_L // k  # Window index of each slot (0 for context).
  offset_L = slot_L % k  # Position of the slot inside its window.
  window_t_BxL = jnp.take_along_axis(
      windows_BxM, jnp.broadcast_to(win_L, (b, idx_L.size)), axis=1)
  # Context attends causally to context; a slot's horizon is its window t.
  horizon_BxL = jnp.where(is_ctx_L, idx_L, window_t_BxL)
  positions_BxL = jnp.where(is_ctx_L, idx_L, window_t_BxL + 1 + offset_L)
  sees_ctx = is_ctx_L[None, None, :] & (
      idx_L[None, None, :] <= horizon_BxL[:, :, None])
  same_window = (~is_ctx_L[:, None] & ~is_ctx_L[None, :]
                 & (win_L[:, None] == win_L[None, :])
                 & (offset_L[None, :] <= offset_L[:, None]))
  return positions_BxL, sees_ctx | same_window[None]


def decode_layout(pad_B, cache_index, num_new: int, cache_size: int):
  """Positions and mask of `num_new` queries written at cache_index.

  Prompts are left-padded: row b's first pad_B[b] slots are padding. Query j
  sits at slot cache_index + j and sees non-pad slots up to its own, so the
  new block is causal: [tokens | noise slots] in that order gives exactly the
  training layout's visibility.
  Returns positions_BxL and mask_BxLxS.
  """
  slots_L = cache_index + jnp.arange(num_new)
  positions_BxL = slots_L[None, :] - pad_B[:, None]
  keys_S = jnp.arange(cache_size)
  mask = ((keys_S[None, None, :] >= pad_B[:, None, None])
          & (keys_S[None, None, :] <= slots_L[None, :, None]))
  # Pad query rows see only themselves, which keeps their softmax finite.
  own = keys_S[None, None, :] == slots_L[None, :, None]
  return positions_BxL, mask | own
