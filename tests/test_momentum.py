"""ALBEF's momentum model: the moving average, the sharded queue, ITC against the queue, distillation, exact resume.

The references are numpy written here: an average updated by hand, a FIFO of batches, a loop over the rows of ITC.
"""

import collections
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import embedding_batch, logged_losses, micro_config, micro_model_config, unit
from xmodal import config as config_lib
from xmodal import losses, sharding
from xmodal.config.defaults import base_config
from xmodal.train import momentum as momentum_lib, state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights
from xmodal.train.step import jit_train_step

TEMPERATURE = 0.1


# ------------------------------------------------------------------------------------------------ the average

@pytest.mark.slow  # compiles and runs the micro train step
def test_moving_average_follows_the_parameters_over_two_steps_and_a_frozen_one_stays_put():
  config = micro_config(batch_size=8)
  config.loss.momentum = 0.9
  config.optim.update(lr=1e-2, warmup_steps=0, freeze=('^vision/',), lr_multipliers=(('^text_proj/', 0.0),))
  config_lib.validate(config)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  built = state_lib.setup(config, mesh, 10)
  weights = LossWeights.from_config(config.loss, config.data)
  step = jit_train_step(built, weights, mesh)
  state = state_lib.create_state(built.model, built.tx, jax.random.key(0), built.shardings, momentum=built.momentum)
  assert isinstance(state, state_lib.MomentumTrainState) and state.queue is None
  params = [jax.device_get(state.params)]
  averages = [jax.device_get(state.momentum_params)]
  rules = [tuple(r) for r in config.mesh.rules]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for seed in range(2):
      batch = synthetic_batch(built.model.spec, 8, np.random.default_rng(seed))
      state, _ = step(state, sharding.host_to_global(batch, mesh), jax.random.key(1))
      params.append(jax.device_get(state.params))
      averages.append(jax.device_get(state.momentum_params))

  close = lambda got, want: jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                                         got, want)
  expected = params[0]  # born equal to the parameters
  close(averages[0], expected)
  for p, got in zip(params[1:], averages[1:]):
    expected = jax.tree.map(lambda m, x: 0.9 * np.float64(m) + 0.1 * np.float64(x), expected, p)
    close(got, expected)
  # The trained parameters moved, and their average trails them: neither where they started nor where they are.
  kernel = lambda tree: np.asarray(tree['text']['layers']['attn']['qkv']['kernel'])
  assert not np.allclose(kernel(params[2]), kernel(params[0]))
  assert not np.allclose(kernel(averages[2]), kernel(params[0]))
  assert not np.allclose(kernel(averages[2]), kernel(params[2]))
  # A frozen tower and a parameter with lr multiplier 0 never move, so their average is exactly where it began.
  for name in ('vision', 'text_proj'):
    jax.tree.map(np.testing.assert_array_equal, params[2][name], params[0][name])
    jax.tree.map(np.testing.assert_array_equal, averages[2][name], params[0][name])


def test_the_default_state_has_no_momentum_leaves():
  config = micro_config()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  built = state_lib.setup(config, mesh, 10)
  assert built.momentum is None
  abstract = built.abstract_state()
  assert type(abstract) is state_lib.TrainState  # pylint: disable=unidiomatic-typecheck
  config.loss.update(momentum=0.995, queue_size=32)
  with_momentum = state_lib.setup(config, mesh, 10).abstract_state()
  assert isinstance(with_momentum, state_lib.MomentumTrainState)
  assert len(jax.tree.leaves(with_momentum)) == 2 * len(jax.tree.leaves(abstract.params)) + len(
      jax.tree.leaves(abstract.opt_state)) + 1 + 4  # step; the queue's image, text, ids and counter
  assert with_momentum.queue.image.shape == (2, 16, config.model.embed_dim)


# -------------------------------------------------------------------------------------------------- the queue

def test_sharded_queue_enqueues_and_wraps_first_in_first_out_like_one_device():
  batch, dim, slots = 8, 4, 3
  spec = momentum_lib.MomentumSpec(queue_size=slots * batch, batch_size=batch, embed_dim=dim)
  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=(batch, dim)).astype(np.float32), rng.normal(size=(batch, dim)).astype(np.float32),
              rng.integers(0, 100, size=batch).astype(np.int32)) for _ in range(5)]  # 5 > 3 slots: wraps twice

  def run(mesh):
    shardings = spec.queue_shardings(mesh)
    rows = sharding.batch_sharding(mesh)
    write = jax.jit(momentum_lib.enqueue, in_shardings=(shardings, rows, rows, rows), out_shardings=shardings)
    queue = jax.jit(spec.empty_queue, out_shardings=shardings)()
    seen = [queue]
    for image, text, ids in batches:
      queue = write(queue, image, text, ids)
      seen.append(queue)
    return seen

  mesh = sharding.make_mesh((4, 2, 1), jax.devices()[:8])
  sharded, single = run(mesh), run(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  # Each slot is split over the 8 devices like the batch: one row of every slot per device.
  assert sharded[-1].image.sharding.spec == jax.sharding.PartitionSpec(None, ('data', 'fsdp'), None)
  assert {s.data.shape for s in sharded[-1].image.addressable_shards} == {(slots, 1, dim)}
  assert {s.data.shape for s in sharded[-1].ids.addressable_shards} == {(slots, 1)}

  fifo = collections.deque(maxlen=slots)  # the reference: the last `slots` batches, oldest first
  for step, (a, b) in enumerate(zip(sharded, single)):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    if step:
      fifo.append(batches[step - 1])
    keys = jax.device_get(a.keys())
    assert keys.valid.sum() == len(fifo) * batch  # what has not been written yet is not valid
    got = np.concatenate([keys.image, keys.text, keys.ids[:, None]], axis=1)[keys.valid]
    want = np.concatenate([np.concatenate([i, t, d[:, None]], axis=1) for i, t, d in fifo] or [got[:0]])
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(want, axis=0))
  assert int(sharded[-1].count) == 5


# --------------------------------------------------------------------------------------------------------- ITC

def _queue(seed, size, batch_ids, dim=16, filled=None):
  """(Q, E) image and text keys, ids that repeat some of the batch's (queued copies of its images), and a valid mask
  whose unfilled tail holds rows with the batch's own ids (they must count neither as positives nor as negatives)."""
  rng = np.random.default_rng(seed)
  ids = rng.choice(np.concatenate([batch_ids, [100, 101, 102]]), size=size)
  valid = np.arange(size) < (size if filled is None else filled)
  return losses.QueuedKeys(unit(rng.normal(size=(size, dim))).astype(np.float32),
                           unit(rng.normal(size=(size, dim))).astype(np.float32), ids.astype(np.int32), valid)


def _momentum_keys(image, text, seed):
  rng = np.random.default_rng(seed)
  return (unit(image + 0.3 * rng.normal(size=image.shape)).astype(np.float32),
          unit(text + 0.3 * rng.normal(size=text.shape)).astype(np.float32))


def _numpy_itc(image, text, image_m, text_m, ids, queue, alpha=0.0):
  """ALBEF's ITC, row by row over the columns that exist: (loss, i2t accuracy, t2i accuracy)."""
  ids = np.arange(len(image)) if ids is None else ids
  keep = np.asarray(queue.valid) if queue is not None else np.zeros(0, bool)
  q_image = np.asarray(queue.image)[keep] if queue is not None else np.zeros((0, image.shape[1]))
  q_text = np.asarray(queue.text)[keep] if queue is not None else np.zeros((0, image.shape[1]))
  q_ids = np.asarray(queue.ids)[keep] if queue is not None else np.zeros(0, int)
  key_ids = np.concatenate([ids, q_ids])
  total, accuracy = 0.0, []
  for queries, queries_m, keys in ((image, image_m, np.concatenate([text_m, q_text])),
                                   (text, text_m, np.concatenate([image_m, q_image]))):
    losses_, right = [], []
    for i in range(len(queries)):
      logits = keys.astype(np.float64) @ queries[i].astype(np.float64) / TEMPERATURE
      log_p = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
      truth = (key_ids == ids[i]).astype(np.float64)
      truth /= truth.sum()
      teacher = np.exp(keys @ queries_m[i] / TEMPERATURE)
      target = alpha * teacher / teacher.sum() + (1 - alpha) * truth
      losses_.append(-np.sum(target * log_p))
      right.append(key_ids[np.argmax(logits)] == ids[i])
    total += 0.5 * np.mean(losses_)
    accuracy.append(np.mean(right))
  return total, accuracy[0], accuracy[1]


@pytest.mark.parametrize('filled', [None, 5, 0])
def test_itc_with_the_queue_and_shared_ids_matches_a_numpy_loop(filled):
  image, text, ids = embedding_batch(0, size=8, dim=16, id_groups=2)
  image_m, text_m = _momentum_keys(image, text, 1)
  queue = _queue(2, 12, ids, filled=filled)
  loss, metrics = losses.momentum_contrastive_loss(image, text, jnp.asarray(TEMPERATURE), image_m, text_m,
                                                   jnp.asarray(ids), jax.tree.map(jnp.asarray, queue))
  want, i2t, t2i = _numpy_itc(image, text, image_m, text_m, ids, queue)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose([float(metrics['itc_i2t_acc']), float(metrics['itc_t2i_acc'])], [i2t, t2i])
  # A queued copy of a batch image is a positive: the same rows with the queue's ids changed give another loss.
  if filled is None:
    other = queue._replace(ids=np.full_like(queue.ids, 999))
    changed, _ = losses.momentum_contrastive_loss(image, text, jnp.asarray(TEMPERATURE), image_m, text_m,
                                                  jnp.asarray(ids), jax.tree.map(jnp.asarray, other))
    np.testing.assert_allclose(float(changed), _numpy_itc(image, text, image_m, text_m, ids, other)[0], rtol=1e-5)
    assert abs(float(changed) - want) > 1e-3


def test_itc_without_ids_takes_the_own_pair_and_no_queued_positive():
  image, text, _ = embedding_batch(3, size=6, dim=16, ids=False)
  image_m, text_m = _momentum_keys(image, text, 4)
  queue = _queue(5, 6, np.arange(6), filled=4)
  loss, _ = losses.momentum_contrastive_loss(image, text, jnp.asarray(TEMPERATURE), image_m, text_m, None,
                                             jax.tree.map(jnp.asarray, queue))
  np.testing.assert_allclose(float(loss), _numpy_itc(image, text, image_m, text_m, None,
                                                     queue._replace(ids=np.full_like(queue.ids, -1)))[0], rtol=1e-5)


def test_itc_gradient_reaches_the_online_embeddings_and_temperature_only():
  image, text, ids = embedding_batch(6, size=8, dim=16)
  image_m, text_m = _momentum_keys(image, text, 7)
  queue = jax.tree.map(jnp.asarray, _queue(8, 8, ids))
  loss = lambda *args: losses.momentum_contrastive_loss(*args, jnp.asarray(ids), queue, jnp.asarray(0.4))[0]
  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(image, text, jnp.asarray(TEMPERATURE), image_m, text_m)
  assert all(float(jnp.abs(g).max()) > 0 for g in grads[:3])
  assert all(float(jnp.abs(g).max()) == 0 for g in grads[3:])


# ------------------------------------------------------------------------------------------------ distillation

@pytest.mark.parametrize('alpha', [0.4, 1.0])
def test_distilled_itc_targets_match_numpy(alpha):
  image, text, ids = embedding_batch(9, size=8, dim=16, id_groups=2)
  image_m, text_m = _momentum_keys(image, text, 10)
  queue = _queue(11, 16, ids, filled=8)
  loss, _ = losses.momentum_contrastive_loss(image, text, jnp.asarray(TEMPERATURE), image_m, text_m,
                                             jnp.asarray(ids), jax.tree.map(jnp.asarray, queue), jnp.asarray(alpha))
  np.testing.assert_allclose(float(loss), _numpy_itc(image, text, image_m, text_m, ids, queue, alpha)[0], rtol=1e-5)
  assert abs(float(loss) - _numpy_itc(image, text, image_m, text_m, ids, queue, 0.0)[0]) > 1e-3


def test_distillation_weight_ramps_linearly_over_its_warmup():
  weights = LossWeights(momentum=0.995, distill_alpha=0.4, distill_warmup=10)
  got = [float(weights.distillation(jnp.asarray(step))) for step in (0, 5, 10, 20)]
  np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.4], rtol=1e-6)
  assert float(LossWeights(momentum=0.995, distill_alpha=0.4).distillation(jnp.asarray(0))) == pytest.approx(0.4)
  assert LossWeights(momentum=0.995).distillation(jnp.asarray(3)) is None


def test_distilled_mlm_loss_matches_numpy():
  rng = np.random.default_rng(12)
  logits, teacher = (rng.normal(size=(3, 5, 7)).astype(np.float32) * 3 for _ in range(2))
  targets = rng.integers(0, 7, size=(3, 5))
  chosen = rng.random((3, 5)) < 0.5
  alpha = 0.3
  loss, _ = losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(chosen),
                                  jnp.asarray(teacher), jnp.asarray(alpha))
  terms = []
  for b, l in zip(*np.nonzero(chosen)):
    row = logits[b, l].astype(np.float64)
    log_p = row - np.log(np.sum(np.exp(row)))
    soft = np.exp(teacher[b, l]) / np.sum(np.exp(teacher[b, l]))
    terms.append(-(1 - alpha) * log_p[targets[b, l]] - alpha * np.sum(soft * log_p))
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize('changes, key', [
    ({'queue_size': 16}, 'loss.queue_size'),  # no momentum model
    ({'distill_alpha': 0.4}, 'loss.distill_alpha'),
    ({'momentum': 0.995, 'queue_size': 20}, 'loss.queue_size'),  # not a multiple of the batch of 8
    ({'momentum': 1.0}, 'loss.momentum'),
    ({'momentum': 0.995, 'queue_size': 16, 'chunked': True}, 'loss.chunked'),
    ({'momentum': 0.995, 'itc_written_negatives': True}, 'loss.itc_written_negatives'),
])
def test_config_refuses_what_the_momentum_model_cannot_run_naming_the_key(changes, key):
  config = micro_config(batch_size=8)
  config.data.negatives_key = 'negative_captions'
  config.loss.update(changes)
  with pytest.raises(config_lib.ConfigError, match=key):
    config_lib.validate(config)


# ------------------------------------------------------------------------------------------------------ resume

def _resume_config(shapes_dir):
  config = base_config('tiny')
  config.model = micro_model_config()
  config.model.text.vocab_size = 256  # the shipped shapes vocabulary has 168 entries
  config.model.mlm_head = True
  config.data.update(tfds_name=shapes_dir, image_size=32, max_text_len=12, batch_size=8, eval_batch_size=8,
                     eval_split='test')
  config.optim.warmup_steps = 2
  # Two slots of one batch: four steps wrap the queue twice; the ramp ends inside the run.
  config.loss.update(momentum=0.9, queue_size=16, distill_alpha=0.4, distill_warmup_steps=2, mlm_weight=1.0)
  config.train.update(steps=4, checkpoint_every=2, keep_checkpoints=5, log_every=1, progress=False)
  config.eval.update(k=4, chunk_size=16)
  config_lib.validate(config)
  return config


@pytest.mark.slow  # three `xmodal train` runs of the micro model in process
def test_resume_with_momentum_queue_and_distillation_matches_an_uninterrupted_run(shapes_dir, tmp_path, monkeypatch):
  from xmodal.train import loop
  from xmodal.train.run import restore_state
  config = _resume_config(shapes_dir)
  loop.train(config, tmp_path / 'straight')
  monkeypatch.setattr(loop.PreemptionGuard, 'should_stop', lambda self, step: step == 3)  # no periodic save at 3
  assert loop.train(config, tmp_path / 'resumed') == {}
  monkeypatch.undo()
  loop.train(config, tmp_path / 'resumed')
  straight, resumed = logged_losses(tmp_path / 'straight'), logged_losses(tmp_path / 'resumed')
  assert [m['step'] for m in resumed] == [1, 2, 3, 4]
  for a, b in zip(straight, resumed):
    np.testing.assert_allclose([a['loss'], a['itc_loss'], a['mlm_loss']], [b['loss'], b['itc_loss'], b['mlm_loss']],
                               rtol=1e-5)

  one = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  states = [jax.device_get(restore_state(config, pathlib.Path(tmp_path / run), None, one)[1])
            for run in ('straight', 'resumed')]
  for state in states:
    assert int(state.step) == 4 and int(state.queue.count) == 4
    assert not np.allclose(state.momentum_params['text_proj']['kernel'], state.params['text_proj']['kernel'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), states[0], states[1])
  # The same checkpoint onto a (4, 2) mesh: the queue comes back sharded over the batch axes, unchanged.
  mesh = sharding.make_mesh((4, 2, 1), jax.devices()[:8])
  on_mesh = restore_state(config, pathlib.Path(tmp_path / 'straight'), None, mesh)[1]
  assert on_mesh.queue.image.sharding.spec == jax.sharding.PartitionSpec(None, ('data', 'fsdp'), None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(on_mesh), states[0])
