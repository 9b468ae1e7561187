"""Region-phrase alignment: boxes to patch cells, max pooling and the loss against plain loops; the regions
xmodal_shapes stores and the training pipeline yields; the objective's region term as its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config, micro_model_config
from xmodal import config as config_lib
from xmodal import losses
from xmodal.models import XModal, build, dummy_inputs, regions
from xmodal.train.objective import LossWeights, compute_loss


def _random_boxes(rng, shape):
  corner = rng.uniform(0.0, 0.8, size=(*shape, 2))
  side = rng.uniform(0.01, 0.5, size=(*shape, 2))
  return np.concatenate([corner, np.minimum(corner + side, 1.0)], axis=-1).astype(np.float32)


def test_a_box_covers_the_patch_cells_it_overlaps():
  rng = np.random.default_rng(0)
  grid = 8
  boxes = _random_boxes(rng, (5, 3))
  boxes[0, 0] = 0.0  # padding: no cell
  boxes[0, 1] = [0.25, 0.5, 0.375, 0.625]  # exactly cell (2, 4): edges touch its neighbours without overlapping them
  cells = np.asarray(regions.region_cells(jnp.asarray(boxes), grid))
  expected = np.zeros((5, 3, grid * grid), bool)
  for b in range(5):
    for r in range(3):
      ymin, xmin, ymax, xmax = boxes[b, r]
      for row in range(grid):
        for col in range(grid):
          top, left = row / grid, col / grid
          overlap_y = min(ymax, top + 1 / grid) - max(ymin, top)
          overlap_x = min(xmax, left + 1 / grid) - max(xmin, left)
          expected[b, r, row * grid + col] = overlap_y > 0 and overlap_x > 0
  np.testing.assert_array_equal(cells, expected)
  assert not cells[0, 0].any() and np.flatnonzero(cells[0, 1]).tolist() == [2 * grid + 4]


def test_a_region_is_the_channelwise_max_of_its_patches():
  rng = np.random.default_rng(1)
  tokens = rng.normal(size=(2, 16, 5)).astype(np.float32)
  cells = rng.random((2, 3, 16)) < 0.3
  cells[1, 2] = False  # a region without a patch pools to zeros
  pooled = np.asarray(regions.pool_regions(jnp.asarray(tokens), jnp.asarray(cells)))
  for b in range(2):
    for r in range(3):
      inside = [tokens[b, n] for n in range(16) if cells[b, r, n]]
      want = np.max(inside, axis=0) if inside else np.zeros(5, np.float32)
      np.testing.assert_allclose(pooled[b, r], want, rtol=0, atol=0)


def _reference_loss(region_emb, phrase_emb, phrase_ids, valid, temperature):
  """The region-phrase InfoNCE written as loops: over valid rows, each direction's softmax over the valid columns,
  the target spread evenly over the regions whose phrase is the same tokens."""
  m = len(valid)
  rows = [i for i in range(m) if valid[i]]
  same = lambda i, j: bool(np.array_equal(phrase_ids[i], phrase_ids[j]))
  total, hits = 0.0, 0
  for i in rows:
    for queries, keys in ((region_emb, phrase_emb), (phrase_emb, region_emb)):
      scores = {j: float(queries[i] @ keys[j]) / temperature for j in rows}
      top = max(scores.values())
      log_z = top + np.log(sum(np.exp(s - top) for s in scores.values()))
      positives = [j for j in rows if same(i, j)]
      total += 0.5 * -sum(scores[j] - log_z for j in positives) / len(positives)
    best = max(rows, key=lambda j: region_emb[i] @ phrase_emb[j])
    hits += same(i, best)
  return total / len(rows), hits / len(rows)


def test_region_phrase_loss_matches_a_loop():
  rng = np.random.default_rng(2)
  m, e = 9, 6
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  region_emb = unit(rng.normal(size=(m, e))).astype(np.float32)
  phrase_emb = unit(rng.normal(size=(m, e))).astype(np.float32)
  phrase_ids = rng.integers(5, 9, size=(m, 3)).astype(np.int32)
  phrase_ids[4] = phrase_ids[1]  # two regions named alike: positives of each other
  phrase_ids[7] = phrase_ids[1]
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
  phrase_ids[2] = phrase_ids[1]  # an invalid row named alike counts for nothing
  loss, metrics = losses.region_phrase_loss(jnp.asarray(region_emb), jnp.asarray(phrase_emb), jnp.asarray(phrase_ids),
                                            jnp.asarray(valid), jnp.float32(0.1))
  want_loss, want_acc = _reference_loss(region_emb, phrase_emb, phrase_ids, valid, 0.1)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['region_acc'], want_acc, rtol=1e-6)
  # Padding rows change nothing: drop them and the loss is the same.
  keep = np.flatnonzero(valid)
  dense, _ = losses.region_phrase_loss(jnp.asarray(region_emb[keep]), jnp.asarray(phrase_emb[keep]),
                                       jnp.asarray(phrase_ids[keep]), jnp.ones(len(keep), bool), jnp.float32(0.1))
  np.testing.assert_allclose(dense, loss, rtol=1e-5)


def test_shapes_regions_are_its_objects(shapes_dir):
  from xmodal.data import sources
  from xmodal.data.shapes import render
  train = sources.tfds_builder(shapes_dir, '').as_data_source('train')
  size = 64
  for i in range(8):
    record = train[i]
    objects, found = record['objects'], record['regions']
    assert len(found['phrase']) == len(objects['x']) >= 1
    for k, (phrase, box) in enumerate(zip(found['phrase'], found['bbox'])):
      color, shape = render.COLORS[objects['color'][k]], render.SHAPES[objects['shape'][k]]
      assert phrase.decode() == f'a {render.SIZES[objects["size"][k]]} {color} {shape}'
      x, y, r = objects['x'][k], objects['y'][k], objects['radius'][k]
      np.testing.assert_allclose(box, np.array([y - r, x - r, y + r, x + r]) / size, atol=1e-6)
      # The centre of every pixel the object covers lies inside its box.
      centres = np.arange(size) + 0.5
      dx, dy = np.broadcast_arrays(centres[None, :] - x, centres[:, None] - y)
      ys, xs = (centres[i] for i in np.nonzero(render.shape_mask(shape, dx, dy, r)))
      assert box[0] * size <= ys.min() and ys.max() <= box[2] * size
      assert box[1] * size <= xs.min() and xs.max() <= box[3] * size


def test_the_training_pipeline_yields_each_images_regions(shapes_dir):
  from xmodal.config.data import data_config
  from xmodal.data import pipeline, sources
  config = data_config(tfds_name=shapes_dir, image_size=32, max_text_len=24, batch_size=16, crop_scale=(1.0, 1.0),
                       region_boxes_key='regions/bbox', region_phrases_key='regions/phrase', max_regions=2,
                       max_phrase_len=8)
  tokenizer = pipeline.load_tokenizer(config)
  batch = next(pipeline.train_iterator(config, tokenizer=tokenizer))
  assert batch['region_boxes'].shape == (16, 2, 4) and batch['region_ids'].shape == (16, 2, 8)
  train = sources.tfds_builder(shapes_dir, '').as_data_source('train')
  for row, image_id in enumerate(batch['image_ids']):
    found = train[int(image_id)]['regions']
    count = min(len(found['phrase']), 2)  # the first max_regions
    np.testing.assert_array_equal(batch['region_valid'][row], np.arange(2) < count)
    np.testing.assert_allclose(batch['region_boxes'][row, :count], np.stack(found['bbox'][:count]), atol=1e-7)
    assert not batch['region_boxes'][row, count:].any()
    ids, mask = tokenizer.encode([p.decode() for p in found['phrase'][:count]], 8)
    np.testing.assert_array_equal(batch['region_ids'][row, :count], ids)
    np.testing.assert_array_equal(batch['region_mask'][row, :count], mask)


@pytest.mark.parametrize('field, value, message', [
    ('data.crop_scale', (0.5, 1.0), 'crop_scale'),
    ('data.hflip', True, 'hflip'),
    ('data.region_phrases_key', '', 'need both'),
])
def test_regions_refuse_what_would_misplace_their_boxes(field, value, message):
  from xmodal.config.data import validate_data_config
  config = micro_config()
  config.data.update(crop_scale=(1.0, 1.0), region_boxes_key='regions/bbox', region_phrases_key='regions/phrase')
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    validate_data_config(config.data)


def test_the_region_weight_needs_regions_from_the_data():
  config = micro_config()
  config.loss.region_weight = 1.0
  with pytest.raises(ValueError, match='data.region_boxes_key'):
    config_lib.validate(config)


@pytest.mark.slow  # compiles the objective twice
def test_the_objective_adds_the_region_term_of_the_models_own_embeddings():
  model = build(micro_model_config())
  params = model.init(jax.random.key(0), *dummy_inputs(model.spec))['params']
  rng = np.random.default_rng(3)
  b, r, length = 4, 2, 5
  batch = {'images': jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32),
           'text_ids': jnp.asarray(rng.integers(5, 60, size=(b, model.spec.max_text_len)), jnp.int32),
           'text_mask': jnp.ones((b, model.spec.max_text_len), jnp.int32), 'image_ids': jnp.arange(b),
           'region_boxes': jnp.asarray(_random_boxes(rng, (b, r))),
           'region_ids': jnp.asarray(rng.integers(5, 60, size=(b, r, length)), jnp.int32),
           'region_mask': jnp.ones((b, r, length), jnp.int32),
           'region_valid': jnp.asarray([[True, True], [True, False], [True, True], [False, False]])}
  key = jax.random.key(0)
  base, _ = compute_loss(model, params, batch, key, LossWeights(itm=0.0))
  weights = LossWeights(itm=0.0, region=0.5, regions_per_example=r, phrase_len=length)
  total, metrics = compute_loss(model, params, batch, key, weights)
  # The reference from the model's public methods.
  variables = {'params': params}
  image_tokens, _ = model.apply(variables, batch['images'], method=XModal.encode_image)
  region_emb = model.apply(variables, image_tokens, batch['region_boxes'], method=XModal.embed_regions)
  ids = batch['region_ids'].reshape(b * r, length)
  _, phrase_emb = model.apply(variables, ids, batch['region_mask'].reshape(b * r, length), method=XModal.encode_text)
  temperature = model.apply(variables, method=XModal.temperature)
  want, _ = losses.region_phrase_loss(region_emb.reshape(b * r, -1), phrase_emb, ids,
                                      batch['region_valid'].reshape(-1), temperature)
  np.testing.assert_allclose(metrics['region_loss'], want, rtol=1e-5)
  np.testing.assert_allclose(total, base + 0.5 * want, rtol=1e-5)


@pytest.mark.slow  # compiles the objective's gradient on one device and on a mesh
def test_the_region_term_sharded_equals_one_device():
  import flax.linen as nn
  from xmodal import sharding
  from xmodal.train.bench import synthetic_batch
  config = micro_config()
  model = build(config.model)
  params = model.init(jax.random.key(0), *dummy_inputs(model.spec))['params']
  weights = LossWeights(itm=0.0, region=1.0, regions_per_example=3, phrase_len=6)
  host = synthetic_batch(model.spec, 16, np.random.default_rng(4), regions=(3, 6))
  host['region_valid'][::3, 2] = False
  host['region_ids'][5, 1] = host['region_ids'][0, 0]  # a phrase shared across shards

  def loss_and_grad(p, batch):
    return jax.value_and_grad(lambda q: compute_loss(model, q, batch, jax.random.key(0), weights)[0])(p)

  single_loss, single_grad = jax.jit(loss_and_grad)(params, jax.tree.map(jnp.asarray, host))
  mesh = sharding.make_mesh((4, 2, 1), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in config.mesh.rules]):
    loss, grad = jax.jit(loss_and_grad)(params, sharding.host_to_global(host, mesh))
  np.testing.assert_allclose(loss, single_loss, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, single_grad)
