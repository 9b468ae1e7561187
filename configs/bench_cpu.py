"""The CPU benchmark model: the train step this 2-core machine is judged by (issue: performance).

  xmodal bench --config configs/bench_cpu.py --steps 20

64 px images, patch 8; ViT 4 layers x 256 (4 heads, MLP 4x); text 2 + fusion 2 layers x 256 (4 heads); embedding
128; vocabulary 4,096; text length 32; batch 64; float32 (~8M parameters). `mfu` in the last line is the step's model
FLOP/s over a large jitted float32 matmul timed in the same run.

Expected on a 2-core AMD EPYC with AVX-512 (2026-12-05, evening): about 0.59 s/step; eager PyTorch on the same model
and step, in the same process, about 0.83 s (benchmarks/compare.py: xmodal at 1.41x). On an older 2-core EPYC, 1.4
against 1.2 s (0.86x): the ratio follows the two libraries' matmuls on the machine (docs/performance.md, "Another
machine").
"""

from xmodal import config as config_lib
from xmodal.config.defaults import base_config


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {'batch': 64})
  config = base_config('tiny')
  m = config.model
  m.image_size, m.max_text_len, m.embed_dim, m.fusion_depth = 64, 32, 128, 2
  m.vision.update(width=256, depth=4, heads=4, mlp_dim=1024, patch_size=8)
  m.text.update(width=256, depth=2, heads=4, mlp_dim=1024, vocab_size=4096, max_positions=64)
  config.data.batch_size = args.batch  # image side and text length follow the model
  return config
