"""The ring (chunked) ITC losses against the naive xmodal.losses functions, on 8 fake CPU devices; their memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import embedding_batch
from xmodal import losses, sharding
from xmodal.losses import ring as losses_chunked


def _batch(seed, size=32, dim=16, ids=True):
  # Few distinct ids: every id is shared by several examples, which land on different devices.
  image, text, image_ids = embedding_batch(seed, size, dim, ids, id_groups=4)
  return jnp.asarray(image), jnp.asarray(text), None if image_ids is None else jnp.asarray(image_ids)


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True))(*args)


def _assert_close(chunked, naive):
  (loss_c, metrics_c), grads_c = chunked
  (loss_n, metrics_n), grads_n = naive
  np.testing.assert_allclose(float(loss_c), float(loss_n), rtol=1e-5)
  assert metrics_c.keys() == metrics_n.keys()
  for key in metrics_n:
    np.testing.assert_allclose(float(metrics_c[key]), float(metrics_n[key]), rtol=1e-5, err_msg=key)
  for index, (gc, gn) in enumerate(zip(grads_c, grads_n)):
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gn), rtol=1e-4, atol=1e-6, err_msg=f'argument {index}')


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize('with_ids', [False, True])
def test_chunked_contrastive_loss_and_grads_match_naive_on_8_devices(mesh_shape, with_ids):
  mesh = sharding.make_mesh(mesh_shape)
  image, text, ids = _batch(0, ids=with_ids)
  naive = _value_and_grads(lambda x, y, t: losses.contrastive_loss(x, y, t, ids), image, text, jnp.float32(0.07))
  chunked = _value_and_grads(lambda x, y, t: losses_chunked.contrastive_loss(x, y, t, ids, mesh=mesh),
                             image, text, jnp.float32(0.07))
  _assert_close(chunked, naive)


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize('with_ids', [False, True])
def test_chunked_sigmoid_loss_and_grads_match_naive_on_8_devices(mesh_shape, with_ids):
  mesh = sharding.make_mesh(mesh_shape)
  image, text, ids = _batch(1, ids=with_ids)
  args = (image, text, jnp.float32(10.0), jnp.float32(-10.0))
  naive = _value_and_grads(lambda x, y, s, b: losses.sigmoid_loss(x, y, s, b, ids), *args)
  chunked = _value_and_grads(lambda x, y, s, b: losses_chunked.sigmoid_loss(x, y, s, b, ids, mesh=mesh), *args)
  _assert_close(chunked, naive)


def test_chunked_accuracy_breaks_ties_like_argmax():
  """Identical texts on different devices tie exactly; argmax picks the first, and so must the ring."""
  mesh = sharding.make_mesh((8, 1, 1))
  image, text, _ = _batch(2, size=16)
  # Texts 0 (device 0) and 9 (device 4) equal image 9: its two best candidates tie, and argmax picks text 0 (wrong).
  text = text.at[9].set(text[0])
  image = image.at[9].set(text[0])
  naive = losses.contrastive_loss(image, text, 0.05)[1]
  chunked = jax.jit(lambda x, y: losses_chunked.contrastive_loss(x, y, 0.05, mesh=mesh))(image, text)[1]
  for key in naive:
    np.testing.assert_allclose(float(chunked[key]), float(naive[key]), rtol=1e-6, err_msg=key)


def test_chunked_loss_rejects_a_batch_the_ring_cannot_split():
  mesh = sharding.make_mesh((8, 1, 1))
  image, text, _ = _batch(3, size=12)
  with pytest.raises(ValueError, match='not divisible'):
    losses_chunked.contrastive_loss(image, text, 0.07, mesh=mesh)


def _temp_bytes(fn, *args):
  grad = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)
  return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('form', ['softmax', 'sigmoid'])
def test_chunked_loss_needs_under_a_quarter_of_the_naive_temporary_memory_at_32k(form):
  """Forward + backward at a global batch of 32,768 over 8 devices, width 256 (compiled, not run)."""
  mesh = sharding.make_mesh((8, 1, 1))
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  emb = jax.ShapeDtypeStruct((32_768, 256), jnp.float32, sharding=rows)
  ids = jax.ShapeDtypeStruct((32_768,), jnp.int32, sharding=rows)
  if form == 'softmax':
    naive = _temp_bytes(lambda x, y, t, i: losses.contrastive_loss(x, y, t, i), emb, emb, scalar, ids)
    chunked = _temp_bytes(lambda x, y, t, i: losses_chunked.contrastive_loss(x, y, t, i, mesh=mesh),
                          emb, emb, scalar, ids)
  else:
    naive = _temp_bytes(lambda x, y, s, i: losses.sigmoid_loss(x, y, s, -10.0, i), emb, emb, scalar, ids)
    chunked = _temp_bytes(lambda x, y, s, i: losses_chunked.sigmoid_loss(x, y, s, -10.0, i, mesh=mesh),
                          emb, emb, scalar, ids)
  assert chunked < naive / 4, (chunked, naive)


def test_chunked_loss_finds_the_mesh_of_jax_set_mesh_under_jit():
  mesh = sharding.make_mesh((4, 2, 1))
  image, text, ids = _batch(4)
  with jax.set_mesh(mesh):
    chunked = jax.jit(lambda x, y: losses_chunked.contrastive_loss(x, y, 0.07, ids)[0])(image, text)
  np.testing.assert_allclose(float(chunked), float(losses.contrastive_loss(image, text, 0.07, ids)[0]), rtol=1e-5)
