"""Text rows computed at their real length: rows sorted by length and cut into buckets, each at its own length.

A caption batch is padded to `max_text_len`, and the text tower and the fusion encoder compute every padded position
as if it were a word. On the shapes data half of every row is padding (captions of 12 tokens in 24). A bucket plan
(`loss.length_buckets`, e.g. ((0.375, 12), (0.375, 16))) says: of a call's R rows, sorted by length, the shortest
3/8 run at length 12, the next 3/8 at 16, the rest at the full length. Each bucket is one call of the same function
on its rows, cut to its length; the outputs are put back in the rows' order (per-token outputs padded with zeros).

Exact where the plan fits: the text tower and the fusion encoder mask padding keys, and nothing after them reads a
padded position (masked means, [CLS], masked losses), so cutting trailing padding changes no number a loss sees beyond
the order of float additions. Whether a batch fits (its shortest 3/8 all at most 12 tokens, ...) is checked on the
host before the step (`fits`; the train loop runs a batch that does not fit through a full-length step). Not inside
the step with a `lax.cond` to a full-length branch: under autodiff the cond keeps both branches' residuals, and its
zero-filled unused ones cost back half of what the buckets gained (shapes step 1.10 s against 1.06 s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (share of a call's rows, their length): rows sorted by length, in order; the rows left over run at full length.
Bucket = tuple[float, int]
# Bucket sizes are whole multiples of this many rows, so that a bucket splits evenly over a mesh's batch axis.
ROW_MULTIPLE = 8


def spans(rows: int, buckets: Sequence[Bucket], full_length: int) -> list[tuple[int, int, int]]:
  """(start, stop, length) of each bucket over `rows` sorted rows: each bucket's share rounded down to a multiple of
  ROW_MULTIPLE (a bucket left empty is dropped), then one last bucket of the rows left at `full_length`."""
  out, start = [], 0
  for share, length in buckets:
    size = int(share * rows) // ROW_MULTIPLE * ROW_MULTIPLE
    if size > 0 and length < full_length:
      out.append((start, start + size, length))
      start += size
  if start < rows:
    out.append((start, rows, full_length))
  return out


def mean_length(buckets: Sequence[Bucket], full_length: int, cost: Callable[[int], float] = float) -> float:
  """The mean over rows of `cost(length)` where a plan fits (the shares as written, before rounding): what
  `models.flops` counts for a bucketed text."""
  left = 1.0 - sum(share for share, _ in buckets)
  return sum(share * cost(length) for share, length in buckets) + left * cost(full_length)


def fits(lengths, buckets: Sequence[Bucket], full_length: int):
  """Whether rows of these lengths (R,) fit the plan: each bucket's longest row, sorted, no longer than the bucket.
  A bool for a numpy array (the loop's check of a host batch), a bool scalar array for a jax one (in a step)."""
  xp = np if isinstance(lengths, np.ndarray) else jnp
  ordered = xp.sort(lengths)
  return xp.all(xp.asarray([ordered[stop - 1] <= length for _, stop, length in spans(len(lengths), buckets,
                                                                                       full_length)]))


def apply_by_length(module: nn.Module, fn: Callable, mask: jax.Array, per_token: Sequence[jax.Array],
                    per_row: Sequence[jax.Array], shared: Sequence[jax.Array], buckets: Sequence[Bucket]
                    ) -> tuple[tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]], jax.Array]:
  """`fn(module, mask, per_token, per_row, shared) -> (token outputs (R, L, ...), row outputs (R, ...))`, run bucket
  by bucket on rows sorted by their length (`mask`'s sum, (R, L)): `per_token` inputs are (R, L, ...) and cut to
  each bucket's length, `per_row` ones (R, ...), `shared` ones reach every bucket whole.

  Returns (fn's outputs in the rows' order, token outputs zero beyond each row's bucket length; whether the plan
  fit, a bool scalar). Where it does not fit, the rows too long for their bucket are cut short: the outputs are
  wrong, and the caller must not have let such a batch in (`fits` on the host, as the train loop does).
  """
  rows, full_length = mask.shape
  plan = spans(rows, buckets, full_length)
  lengths = jnp.sum(mask.astype(jnp.int32), axis=1)
  if len(plan) == 1:  # nothing to cut: one bucket at full length
    out_tokens, out_rows = fn(module, mask, list(per_token), list(per_row), shared)
    return (tuple(out_tokens), tuple(out_rows)), jnp.bool_(True)
  order = jnp.argsort(lengths, stable=True)
  token_parts, row_parts = [], []
  for start, stop, length in plan:
    rows_of = order[start:stop]
    out_tokens, out_rows = fn(module, mask[rows_of, :length], [x[rows_of, :length] for x in per_token],
                              [x[rows_of] for x in per_row], shared)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, full_length - length)] + [(0, 0)] * (x.ndim - 2))
    token_parts.append([pad(x) for x in out_tokens])
    row_parts.append(list(out_rows))
  unsort = jnp.zeros_like(order).at[order].set(jnp.arange(rows, dtype=order.dtype))
  gather = lambda parts: tuple(jnp.concatenate(outs)[unsort] for outs in zip(*parts))
  return (gather(token_parts), gather(row_parts)), fits(lengths, buckets, full_length)
