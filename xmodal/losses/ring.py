"""ITC losses over a batch sharded on the mesh, computed one (local rows × remote block) tile at a time.

`xmodal.losses.contrastive_loss` / `sigmoid_loss` build the whole (B, B) logit matrix; sharded by XLA, each device
still holds (B / n, B) logits and their gradients. Here each device keeps its own rows and a ring
(`jax.lax.ppermute` over the batch axes ('data', 'fsdp')) passes the other devices' text embeddings by, one block of
B / n at a time: the i2t softmax is a streaming logsumexp over the blocks, and the t2i statistics of the travelling
texts ride along with them and arrive home after the n-th hop (ring attention's layout; SigLIP's chunked sigmoid
loss). Memory per device is O((B / n)² + (B / n)·E) instead of O(B² / n).

The backward pass is a second ring (`jax.custom_vjp`): it recomputes each tile's logits, accumulates the gradient of
the local rows in place and that of the travelling texts beside them, which again arrive home after n hops. Nothing
of size B / n × B is ever saved for the backward pass.

Same results as the naive functions (loss, gradients with respect to both embeddings and temperature / scale / bias,
accuracy metrics with argmax's first-index tie-break), to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from xmodal.sharding import BATCH_AXES

__all__ = ['contrastive_loss', 'sigmoid_loss']


def _resolve_mesh(mesh: Mesh | AbstractMesh | None) -> Mesh | AbstractMesh:
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError('no mesh: pass mesh= or call inside `with jax.set_mesh(mesh):`')
  return mesh


def _axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def _ring_size(mesh: Mesh) -> int:
  size = 1
  for axis in _axes(mesh):
    size *= mesh.shape[axis]
  return size


def _global_ids(ids: jax.Array | None, size: int) -> jax.Array:
  """Without ids every example is its own positive: its index is an id that only it carries."""
  return jnp.arange(size, dtype=jnp.int32) if ids is None else ids.astype(jnp.int32)


def _ring_loop(mesh: Mesh, body, local, travelling):
  """Runs body(k, source, local, travelling) n times, passing `travelling` one device on after each; after the n-th
  hop every travelling block is back on the device it started from. `source` is the ring index the block came from."""
  axes = _axes(mesh)
  n = _ring_size(mesh)
  me = jax.lax.axis_index(axes) if axes else 0
  perm = [(i, (i + 1) % n) for i in range(n)]
  if axes:  # fresh accumulators (zeros) must be typed as device-varying like what the loop writes into them
    local, travelling = jax.tree.map(lambda x: _make_varying(x, axes), (local, travelling))

  def step(k, carry):
    local, travelling = carry
    local, travelling = body(k, (me - k) % n, local, travelling)
    if n > 1:
      travelling = jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), travelling)
    return local, travelling
  return jax.lax.fori_loop(0, n, step, (local, travelling))


def _make_varying(x, axes):
  missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
  return jax.lax.pcast(x, missing, to='varying') if missing else x


def _psum(mesh, x):
  axes = _axes(mesh)
  return jax.lax.psum(x, axes) if axes else x


def _shard(mesh, fn, in_specs, out_specs):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# ------------------------------------------------------------------------------------------------ softmax (InfoNCE)

def _running_best(best, best_pos, best_idx, values, positive, offset, axis):
  """Updates a running argmax (first index on ties) with one block; tracks whether the best is a positive."""
  block_idx = jnp.argmax(values, axis=axis)
  block_best = jnp.max(values, axis=axis)
  block_pos = jnp.take_along_axis(positive, jnp.expand_dims(block_idx, axis), axis=axis).squeeze(axis)
  block_idx = block_idx.astype(jnp.int32) + offset
  better = (block_best > best) | ((block_best == best) & (block_idx < best_idx))
  return (jnp.where(better, block_best, best), jnp.where(better, block_pos, best_pos),
          jnp.where(better, block_idx, best_idx))


def _online_lse(m, s, values, axis):
  """Merges one block into a running (max, sum of exp(x - max))."""
  new_m = jnp.maximum(m, jnp.max(values, axis=axis))
  s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(values - jnp.expand_dims(new_m, axis)), axis=axis)
  return new_m, s


def _contrastive_forward_local(mesh, image, text, temperature, ids):
  """Per device: image/text (b, E), ids (b,). Returns loss, accuracies, and per-row residuals."""
  b = image.shape[0]
  n = _ring_size(mesh)
  me = jax.lax.axis_index(_axes(mesh)) if _axes(mesh) else 0  # the local images' ring index
  neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((b,), jnp.float32)
  big = jnp.full((b,), jnp.iinfo(jnp.int32).max, jnp.int32)
  false = jnp.zeros((b,), bool)
  # Row statistics of the local images (i2t) stay; column statistics of the travelling texts (t2i) move with them.
  row = (neg_inf, zeros, zeros, zeros, neg_inf, false, big)  # lse max, lse sum, sum of positive logits, count, best..
  col = (text, ids, neg_inf, zeros, zeros, neg_inf, false, big)

  def body(_, source, row, col):
    r_m, r_s, r_pos, r_cnt, r_best, r_bpos, r_bidx = row
    text_r, ids_r, c_m, c_s, c_pos, c_best, c_bpos, c_bidx = col
    logits = jnp.einsum('ie,te->it', image, text_r) / temperature  # (local images, travelling texts)
    positive = ids[:, None] == ids_r[None, :]
    pos_f = positive.astype(jnp.float32)
    r_m, r_s = _online_lse(r_m, r_s, logits, axis=1)
    c_m, c_s = _online_lse(c_m, c_s, logits, axis=0)
    r_pos = r_pos + jnp.sum(pos_f * logits, axis=1)
    c_pos = c_pos + jnp.sum(pos_f * logits, axis=0)
    r_cnt = r_cnt + jnp.sum(pos_f, axis=1)
    stopped = jax.lax.stop_gradient(logits)
    r_best, r_bpos, r_bidx = _running_best(r_best, r_bpos, r_bidx, stopped, positive, source * b, axis=1)
    c_best, c_bpos, c_bidx = _running_best(c_best, c_bpos, c_bidx, stopped, positive, me * b, axis=0)
    return ((r_m, r_s, r_pos, r_cnt, r_best, r_bpos, r_bidx),
            (text_r, ids_r, c_m, c_s, c_pos, c_best, c_bpos, c_bidx))

  row, col = _ring_loop(mesh, body, row, col)
  r_m, r_s, r_pos, count, _, r_bpos, _ = row
  _, _, c_m, c_s, c_pos, _, c_bpos, _ = col
  # Positives are symmetric (equal ids), so text j has as many positive images as image j has positive texts.
  row_lse = r_m + jnp.log(r_s)
  col_lse = c_m + jnp.log(c_s)
  total = jnp.sum(row_lse - r_pos / count) + jnp.sum(col_lse - c_pos / count)
  size = b * n
  loss = 0.5 * _psum(mesh, total) / size
  i2t = _psum(mesh, jnp.sum(r_bpos.astype(jnp.float32))) / size
  t2i = _psum(mesh, jnp.sum(c_bpos.astype(jnp.float32))) / size
  return loss, i2t, t2i, row_lse, col_lse, count


def _contrastive_backward_local(mesh, image, text, temperature, ids, row_lse, col_lse, count, g):
  b = image.shape[0]
  size = b * _ring_size(mesh)
  coef = g * 0.5 / size
  local = (jnp.zeros_like(image), jnp.zeros((), jnp.float32))
  travelling = (text, ids, col_lse, count, jnp.zeros_like(text))

  def body(_, source, local, travelling):
    d_image, d_temp = local
    text_r, ids_r, col_lse_r, count_r, d_text_r = travelling
    logits = jnp.einsum('ie,te->it', image, text_r) / temperature
    pos_f = (ids[:, None] == ids_r[None, :]).astype(jnp.float32)
    # d loss / d logits: softmax over rows and over columns, minus the spread targets of both directions.
    grad = coef * (jnp.exp(logits - row_lse[:, None]) - pos_f / count[:, None]
                   + jnp.exp(logits - col_lse_r[None, :]) - pos_f / count_r[None, :])
    d_image = d_image + jnp.einsum('it,te->ie', grad, text_r) / temperature
    d_text_r = d_text_r + jnp.einsum('it,ie->te', grad, image) / temperature
    d_temp = d_temp - jnp.sum(grad * logits) / temperature
    return (d_image, d_temp), (text_r, ids_r, col_lse_r, count_r, d_text_r)

  (d_image, d_temp), travelling = _ring_loop(mesh, body, local, travelling)
  return d_image, travelling[-1], _psum(mesh, d_temp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _contrastive(mesh, image, text, temperature, ids):
  return _contrastive_fwd(mesh, image, text, temperature, ids)[0]


def _contrastive_fwd(mesh, image, text, temperature, ids):
  rows = P(_axes(mesh))
  fn = _shard(mesh, functools.partial(_contrastive_forward_local, mesh), (rows, rows, P(), rows),
              (P(), P(), P(), rows, rows, rows))
  loss, i2t, t2i, row_lse, col_lse, count = fn(image, text, temperature, ids)
  return (loss, i2t, t2i), (image, text, temperature, ids, row_lse, col_lse, count)


def _contrastive_bwd(mesh, residuals, cotangents):
  image, text, temperature, ids, row_lse, col_lse, count = residuals
  g = cotangents[0]
  rows = P(_axes(mesh))
  fn = _shard(mesh, functools.partial(_contrastive_backward_local, mesh),
              (rows, rows, P(), rows, rows, rows, rows, P()), (rows, rows, P()))
  d_image, d_text, d_temp = fn(image, text, temperature, ids, row_lse, col_lse, count, g)
  return d_image, d_text, d_temp, None


_contrastive.defvjp(_contrastive_fwd, _contrastive_bwd)


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array, ids: jax.Array | None = None,
                     *, mesh: Mesh | AbstractMesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`xmodal.losses.contrastive_loss`, computed blockwise over the mesh's batch axes.

  Args:
    image_emb: (B, E) unit-norm image embeddings; B divisible by the product of the ('data', 'fsdp') sizes.
    text_emb: (B, E) unit-norm text embeddings; row i describes image i.
    temperature: scalar.
    ids: (B,) integer image ids or None; equal ids are positives, targets spread evenly over them.
    mesh: the device mesh; the batch is split over its ('data', 'fsdp') axes (any other axis holds copies).
      None: the mesh of the enclosing `jax.set_mesh` (what the jitted train step runs under).

  Returns:
    (loss, metrics) with 'itc_loss', 'itc_i2t_acc', 'itc_t2i_acc', as the naive function.
  """
  mesh = _resolve_mesh(mesh)
  size = image_emb.shape[0]
  _check_divisible(size, mesh)
  loss, i2t, t2i = _contrastive(mesh, image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
                                jnp.asarray(temperature, jnp.float32), _global_ids(ids, size))
  return loss, {'itc_loss': loss, 'itc_i2t_acc': i2t, 'itc_t2i_acc': t2i}


# ---------------------------------------------------------------------------------------------- sigmoid (SigLIP)

def _sigmoid_forward_local(mesh, image, text, scale, bias, ids):
  b = image.shape[0]

  def body(_, source, total, travelling):
    text_r, ids_r = travelling
    logits = scale * jnp.einsum('ie,te->it', image, text_r) + bias
    signs = jnp.where(ids[:, None] == ids_r[None, :], 1.0, -1.0)
    return total + jnp.sum(jax.nn.log_sigmoid(signs * logits)), travelling

  total, _ = _ring_loop(mesh, body, jnp.zeros((), jnp.float32), (text, ids))
  return -_psum(mesh, total) / (b * _ring_size(mesh))


def _sigmoid_backward_local(mesh, image, text, scale, bias, ids, g):
  size = image.shape[0] * _ring_size(mesh)
  local = (jnp.zeros_like(image), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  def body(_, source, local, travelling):
    d_image, d_scale, d_bias = local
    text_r, ids_r, d_text_r = travelling
    sims = jnp.einsum('ie,te->it', image, text_r)
    signs = jnp.where(ids[:, None] == ids_r[None, :], 1.0, -1.0)
    # d/dl [-log sigmoid(z l)] = -z sigmoid(-z l)
    grad = (-g / size) * signs * jax.nn.sigmoid(-signs * (scale * sims + bias))
    d_image = d_image + scale * jnp.einsum('it,te->ie', grad, text_r)
    d_text_r = d_text_r + scale * jnp.einsum('it,ie->te', grad, image)
    return (d_image, d_scale + jnp.sum(grad * sims), d_bias + jnp.sum(grad)), (text_r, ids_r, d_text_r)

  (d_image, d_scale, d_bias), travelling = _ring_loop(mesh, body, local, (text, ids, jnp.zeros_like(text)))
  return d_image, travelling[-1], _psum(mesh, d_scale), _psum(mesh, d_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sigmoid(mesh, image, text, scale, bias, ids):
  return _sigmoid_fwd(mesh, image, text, scale, bias, ids)[0]


def _sigmoid_fwd(mesh, image, text, scale, bias, ids):
  rows = P(_axes(mesh))
  fn = _shard(mesh, functools.partial(_sigmoid_forward_local, mesh), (rows, rows, P(), P(), rows), P())
  return fn(image, text, scale, bias, ids), (image, text, scale, bias, ids)


def _sigmoid_bwd(mesh, residuals, g):
  image, text, scale, bias, ids = residuals
  rows = P(_axes(mesh))
  fn = _shard(mesh, functools.partial(_sigmoid_backward_local, mesh), (rows, rows, P(), P(), rows, P()),
              (rows, rows, P(), P()))
  d_image, d_text, d_scale, d_bias = fn(image, text, scale, bias, ids, g)
  return d_image, d_text, d_scale, d_bias, None


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, bias: jax.Array,
                 ids: jax.Array | None = None, *, mesh: Mesh | AbstractMesh | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`xmodal.losses.sigmoid_loss` (SigLIP), computed blockwise over the mesh's batch axes (SigLIP's chunked ring).

  Args:
    image_emb, text_emb: (B, E); B divisible by the product of the ('data', 'fsdp') sizes.
    scale, bias: scalars; logits = scale * <x_i, y_j> + bias.
    ids: (B,) integer image ids or None.
    mesh: the device mesh; None: the mesh of the enclosing `jax.set_mesh`.

  Returns:
    (loss, metrics) with 'sigmoid_loss'.
  """
  mesh = _resolve_mesh(mesh)
  size = image_emb.shape[0]
  _check_divisible(size, mesh)
  loss = _sigmoid(mesh, image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
                  jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32), _global_ids(ids, size))
  return loss, {'sigmoid_loss': loss}


def _check_divisible(size: int, mesh: Mesh) -> None:
  n = _ring_size(mesh)
  if size % n:
    raise ValueError(f'batch {size} is not divisible by the {n} devices of the mesh axes {_axes(mesh)}')
