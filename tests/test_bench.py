"""`xmodal bench`'s result: MFU against both peaks, each named (the performance issue's "honest MFU")."""

import pytest

from xmodal.train import bench
from helpers import micro_config


@pytest.mark.slow  # compiles the micro train step twice
def test_mfu_names_its_basis_and_reports_both_peaks():
  config = micro_config()
  config.train.peak_flops_per_device = 0.0  # a CPU: no datasheet peak in the table
  measured = bench.run(config, steps=1)
  assert measured['mfu_basis'] == 'measured matmul'
  assert measured['mfu_datasheet'] is None and measured['peak_tflops_datasheet'] is None
  ratio = measured['tflops_per_device'] / measured['peak_tflops_measured_matmul']
  assert measured['mfu'] == pytest.approx(ratio) and measured['mfu_measured_matmul'] == pytest.approx(ratio)

  config.train.peak_flops_per_device = 2e12  # a datasheet peak given in the config
  sheet = bench.run(config, steps=1)
  assert sheet['mfu_basis'] == 'datasheet' and sheet['peak_tflops_datasheet'] == pytest.approx(2.0)
  assert sheet['mfu'] == pytest.approx(sheet['tflops_per_device'] / 2.0) == pytest.approx(sheet['mfu_datasheet'])
  # The measured peak is still reported beside it, and the step's throughput is over one or the other.
  per_device = sheet['tflops_per_device']
  assert sheet['mfu_measured_matmul'] == pytest.approx(per_device / sheet['peak_tflops_measured_matmul'])
  assert per_device == pytest.approx(sheet['flops_per_step'] / sheet['step_s'] / sheet['devices'] / 1e12)
