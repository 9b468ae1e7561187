"""benchmarks/torch_reference.py, the eager PyTorch step that benchmarks/compare.py sets against xmodal's, is the same
model doing the same work: parameters name for name, the same outputs from the same weights, the same analytic FLOPs
(each side counted from its own layers), and a step that trains."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test-only reference
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import ROOT, micro_config
from xmodal import config as config_lib
from xmodal.models import build, dummy_inputs, flops
from xmodal.models.model import XModal
from xmodal.train import optim
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights, compute_loss

sys.path.insert(0, str(ROOT / 'benchmarks'))
import torch_reference  # noqa: E402  (outside the package on purpose: xmodal never imports it)

BENCH_CPU = str(ROOT / 'configs' / 'bench_cpu.py')


def _xmodal_params(model, abstract: bool = False) -> dict[str, np.ndarray]:
  """{'a/b/kernel': array} of the model's initialisation from key 0 (zeros of its shapes with `abstract`)."""
  init = lambda: nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  params = jax.eval_shape(init) if abstract else jax.jit(init)()
  leaves = [np.zeros(x.shape, x.dtype) if abstract else np.asarray(x) for x in jax.tree.leaves(params)]
  return dict(zip(optim.param_paths(params), leaves)), params


def test_reference_has_xmodals_bench_cpu_parameters_name_for_name():
  config = config_lib.load(BENCH_CPU)
  model = build(config.model)
  flat, params = _xmodal_params(model, abstract=True)
  reference = torch_reference.Reference(config.model)
  torch_reference.load_xmodal_params(reference, flat)  # raises on a missing, extra or differently shaped tensor
  assert torch_reference.num_params(reference) == sum(x.size for x in flat.values()) == 8_044_549
  # Weight decay on the same parameters.
  decayed = sum(x.size for x, d in zip(flat.values(), jax.tree.leaves(optim.decay_mask(params))) if d)
  assert decayed == sum(p.numel() for module in reference.modules()
                        for name, p in module.named_parameters(recurse=False) if torch_reference.decays(module, name))


def test_reference_flops_equal_xmodals_on_bench_cpu():
  config = config_lib.load(BENCH_CPU)
  spec = build(config.model).spec
  weights = LossWeights.from_config(config.loss)
  reference = torch_reference.Reference(config.model)
  batch, length = config.data.batch_size, config.model.max_text_len
  assert torch_reference.forward_flops(reference, batch, length, weights.itm_pairs) == flops.forward_flops(
      spec, batch, weights.itm_pairs)
  assert torch_reference.train_flops(reference, batch, length, weights.itm_pairs) == flops.train_flops(
      spec, batch, weights.itm_pairs) == 153_139_150_848
  # 180,657,389,568 with every token through the last fusion layer (a match reads [CLS] alone); 193,743,618,048 with
  # keys and values projected for each of the 3B pairs as well, as ALBEF's code does.


def test_reference_forward_flops_are_what_torch_counts():
  # The analytic count against torch's own counter of the matmuls, convolutions and attention a forward pass ran.
  config = config_lib.load(BENCH_CPU)
  reference = torch_reference.Reference(config.model)
  batch = torch_reference.to_torch_batch(synthetic_batch(build(config.model).spec, 4, np.random.default_rng(0)))
  counter = FlopCounterMode(display=False)
  # The counter knows no fused CPU attention kernel; the math backend's batched matmuls it counts.
  with counter, sdpa_kernel(SDPBackend.MATH):
    torch_reference.compute_loss(reference, batch, torch.Generator().manual_seed(0), config.loss)
  expected = torch_reference.forward_flops(reference, 4, config.model.max_text_len)
  assert counter.get_total_flops() == sum(expected.values())


@pytest.mark.slow  # compiles the micro model's encoders, fusion and loss
@pytest.mark.parametrize('pool', ['cls', 'mean_fc_norm', 'max'])
def test_reference_computes_xmodals_outputs_from_the_same_weights(pool):
  config = micro_config(batch_size=6)
  config.model.pool = pool
  config.loss.itm_weight = 0.0  # ITM draws its negatives with another generator: compared through the logits
  model = build(config.model)
  flat, params = _xmodal_params(model)
  reference = torch_reference.Reference(config.model)
  torch_reference.load_xmodal_params(reference, flat)
  batch = synthetic_batch(model.spec, 6, np.random.default_rng(1))
  ours = torch_reference.to_torch_batch(batch)
  apply = lambda method, *args: model.apply({'params': params}, *map(jnp.asarray, args), method=method)
  image_tokens, image_emb = apply(XModal.encode_image, batch['images'])
  text_tokens, text_emb = apply(XModal.encode_text, batch['text_ids'], batch['text_mask'])
  logits = apply(XModal.match, text_tokens, batch['text_mask'], image_tokens[::-1])
  index = np.array([5, 0, 5, 2, 2, 1])  # images named by index, some twice: keys and values projected once each
  indexed = model.apply({'params': params}, text_tokens, jnp.asarray(batch['text_mask']), image_tokens,
                        image_index=jnp.asarray(index), method=XModal.match)
  with torch.no_grad():
    ref_image_tokens, ref_image_emb = reference.encode_image(ours['images'])
    ref_text_tokens, ref_text_emb = reference.encode_text(ours['text_ids'], ours['text_mask'])
    ref_logits = reference.match(ref_text_tokens, ours['text_mask'], ref_image_tokens.flip(0))
    ref_indexed = reference.match(ref_text_tokens, ours['text_mask'], ref_image_tokens, torch.from_numpy(index))
    ref_loss, _ = torch_reference.compute_loss(reference, ours, torch.Generator(), config.loss)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=2e-5, rtol=1e-4)
  close(image_tokens, ref_image_tokens)
  close(image_emb, ref_image_emb)
  close(text_tokens, ref_text_tokens)
  close(text_emb, ref_text_emb)
  close(logits, ref_logits)
  close(indexed, ref_indexed)
  loss, _ = compute_loss(model, params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0),
                         LossWeights.from_config(config.loss))
  close(loss, ref_loss)


def test_reference_learning_rate_is_xmodals_schedule():
  config = micro_config()
  config.optim.update(lr=3e-4, warmup_steps=5)
  schedule = optim.schedule(config.optim, 20)
  for step in (0, 1, 4, 5, 6, 12, 19, 20, 25):
    assert torch_reference.learning_rate(config.optim, 20, step) == pytest.approx(float(schedule(step)), rel=1e-5)


def test_reference_step_lowers_the_loss_on_a_fixed_batch():
  config = micro_config(batch_size=8)
  config.optim.update(lr=1e-3, warmup_steps=0)
  step = torch_reference.ReferenceStep(config, total_steps=100)
  batch = torch_reference.to_torch_batch(synthetic_batch(build(config.model).spec, 8, np.random.default_rng(0)))
  losses = [step(batch)['loss'] for _ in range(6)]
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def test_reference_refuses_settings_it_does_not_implement():
  config = micro_config()
  config.loss.sigmoid_weight = 1.0
  with pytest.raises(ValueError, match='loss.sigmoid_weight'):
    torch_reference.ReferenceStep(config, total_steps=10)
