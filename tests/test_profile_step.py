"""benchmarks/profile_step.py: operations are classed and attributed from the optimised HLO, and a traced step's
time is summed per operation of the compiled step."""

import sys

import pytest

from helpers import ROOT, micro_config

sys.path.insert(0, str(ROOT / 'benchmarks'))
import profile_step  # noqa: E402  (outside the package on purpose: xmodal never imports it)

# Lines as XLA:CPU prints an optimised module (shortened), one per kind of operation the tables tell apart.
HLO = '''
ENTRY %main.1 (p: f32[4,8]) -> f32[4,8] {
  %ynn_fusion.3 = f32[4160,512]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, metadata={op_name="jit(train_step)/jvp(XModal.encode_image)/vision/while/body/layers/mlp/fc1/dot_general"}
  %dot.508 = f32[256,4,65,32]{3,2,1,0} dot(%a, %b), lhs_batch_dims={0,1}, metadata={op_name="jit(train_step)/transpose(jvp(XModal.match))/fusion/while/body/layers/cross_attn/bhqk,bkhd->bqhd"}
  %wrapped_broadcast.12 = f32[4,64,65,512]{3,2,1,0} fusion(%constant.1), kind=kLoop, calls=%w, metadata={op_name="jit(train_step)/jvp(XModal.encode_image)/vision/broadcast_in_dim"}
  %broadcast_divide_fusion.8 = f32[256,24,512]{2,1,0} fusion(%x), kind=kLoop, calls=%d, metadata={op_name="jit(train_step)/transpose(jvp(XModal.match))/fusion/layers/mlp/erfc"}
  %transpose_copy_fusion.60 = f32[32,32,32,64]{3,2,1,0} fusion(%y, %z), kind=kLoop, calls=%t
  %bitcast_dynamic-update-slice_fusion.2 = f32[2,64,24,512]{3,2,1,0} fusion(%y), kind=kLoop, calls=%u, metadata={op_name="jit(train_step)/jvp(XModal.encode_text)/text/while/body/dynamic_update_slice"}
  %add_gather_fusion.1 = f32[256,1,65,2,4,32]{5,4,3,2,1,0} fusion(%y), kind=kLoop, calls=%g, metadata={op_name="jit(train_step)/jvp(XModal.match)/fusion/cross_attn/jit(_take)/gather"}
  %while.135 = (s32[], f32[4,8]) while(%tuple), condition=%cond, body=%body
  ROOT %add.1 = f32[4,8]{1,0} add(%p, %p), metadata={op_name="jit(train_step)/adam/add"}
}
'''


def test_operations_are_read_with_their_shape_and_origin():
  operations = profile_step.hlo_operations(HLO)
  assert set(operations) == {'ynn_fusion.3', 'dot.508', 'wrapped_broadcast.12', 'broadcast_divide_fusion.8',
                             'transpose_copy_fusion.60', 'bitcast_dynamic-update-slice_fusion.2',
                             'add_gather_fusion.1', 'while.135', 'add.1'}
  assert operations['dot.508'].opcode == 'dot'
  assert operations['dot.508'].shape == 'f32[256,4,65,32]{3,2,1,0}'
  assert operations['ynn_fusion.3'].op_name.endswith('mlp/fc1/dot_general')
  assert operations['transpose_copy_fusion.60'].op_name == ''


def test_classes_and_parts():
  operations = profile_step.hlo_operations(HLO)
  classes = {name: profile_step.op_class(op) for name, op in operations.items() if op.opcode != 'while'}
  assert classes == {'ynn_fusion.3': 'matmul or convolution', 'dot.508': 'matmul or convolution',
                     'wrapped_broadcast.12': 'broadcast',
                     'broadcast_divide_fusion.8': 'elementwise',  # an elementwise fusion named after its first op
                     'transpose_copy_fusion.60': 'copy or transpose',
                     'bitcast_dynamic-update-slice_fusion.2': 'slicing', 'add_gather_fusion.1': 'gather or scatter',
                     'add.1': 'elementwise'}
  parts = {name: profile_step.model_part(op) for name, op in operations.items()}
  assert parts['ynn_fusion.3'] == 'vision'
  assert parts['dot.508'] == 'fusion backward'
  assert parts['bitcast_dynamic-update-slice_fusion.2'] == 'text'
  assert parts['add.1'] == 'losses and optimizer'


def test_trace_events_are_summed_per_operation_and_containers_left_out():
  operations = profile_step.hlo_operations(HLO)
  trace = {'traceEvents': [
      {'ph': 'X', 'name': 'dot.508', 'dur': 30}, {'ph': 'X', 'name': 'dot.508', 'dur': 10},
      {'ph': 'X', 'name': 'while.135', 'dur': 500},  # holds the others: counting it would count them twice
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 900},  # not an operation of the step
      {'ph': 'i', 'name': 'ynn_fusion.3', 'dur': 70},  # not a complete event
      {'ph': 'X', 'name': 'wrapped_broadcast.12', 'dur': 60}]}
  durations = profile_step.traced_durations(trace, operations)
  assert {operation.name: micros for operation, micros in durations.items()} == {'dot.508': 40,
                                                                                 'wrapped_broadcast.12': 60}
  shares = profile_step.grouped(durations, profile_step.op_class)
  assert list(shares) == ['broadcast', 'matmul or convolution']
  assert shares['broadcast'] == pytest.approx(0.6)


# As XLA:GPU prints the library calls: a cuBLASLt gemm and cuDNN's fused attention (shortened).
GPU_HLO = '''
  %custom-call.7 = (bf16[6144,3072]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(XModal.encode_image)/vision/while/body/layers/mlp/fc1/dot_general"}
  %custom-call.9 = (bf16[256,264,12,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/jvp(XModal.encode_image)/vision/while/body/layers/attn/dot_product_attention"}
  %loop_add_fusion.4 = bf16[256,257,768]{2,1,0} fusion(%x, %y), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/jvp(XModal.encode_image)/vision/add"}
'''


def test_a_gpu_trace_counts_device_kernels_by_their_hlo_op_and_classes_library_calls():
  operations = profile_step.hlo_operations(GPU_HLO)
  assert operations['custom-call.7'].target == '__cublas$lt$matmul'
  assert profile_step.op_class(operations['custom-call.7']) == 'matmul or convolution'
  assert profile_step.op_class(operations['custom-call.9']) == 'attention (cuDNN)'
  assert profile_step.op_class(operations['loop_add_fusion.4']) == 'elementwise'
  trace = {'traceEvents': [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 7, 'args': {'name': '/device:GPU:0 (stream 1)'}},
      # The host's launch of an operation shares its name: only the device's kernels are counted.
      {'ph': 'X', 'pid': 1, 'name': 'loop_add_fusion.4', 'dur': 1000},
      {'ph': 'X', 'pid': 7, 'name': 'loop_add_fusion.4', 'dur': 3},
      # A fusion's kernel is named after it, with '_' for '.', inside a CUDA graph too.
      {'ph': 'X', 'pid': 7, 'name': 'loop_add_fusion_4', 'dur': 2, 'args': {'hlo_op': 'command_buffer_3'}},
      # Library kernels carry their own names; outside a CUDA graph the operation is in args.hlo_op ...
      {'ph': 'X', 'pid': 7, 'name': 'sm90_xmma_gemm_bf16bf16', 'dur': 20, 'args': {'hlo_op': 'custom-call.7'}},
      {'ph': 'X', 'pid': 7, 'name': 'cudnn_generated_sdpa', 'dur': 7, 'args': {'hlo_op': 'custom-call.9'}},
      # ... inside one only the graph is named: the kernel stands for itself, classed by its name.
      {'ph': 'X', 'pid': 7, 'name': 'nvjet_sm90_tst_128x160', 'dur': 30, 'args': {'hlo_op': 'command_buffer_3'}},
      {'ph': 'X', 'pid': 7, 'name': 'cudnn_sm90_flash_bprop_wgmma', 'dur': 9, 'args': {'hlo_op': 'command_buffer_3'}},
      {'ph': 'X', 'pid': 7, 'name': 'memcpy128', 'dur': 50, 'args': {}}]}
  durations = profile_step.traced_durations(trace, operations)
  assert {operation.name: micros for operation, micros in durations.items()} == {
      'loop_add_fusion.4': 5, 'custom-call.7': 20, 'custom-call.9': 7, 'nvjet_sm90_tst_128x160': 30,
      'cudnn_sm90_flash_bprop_wgmma': 9, 'memcpy128': 50}
  by_class = profile_step.grouped(durations, profile_step.op_class)
  assert by_class['matmul or convolution'] == pytest.approx(50 / 121)
  assert by_class['attention (cuDNN)'] == pytest.approx(16 / 121)
  assert by_class['copy or transpose'] == pytest.approx(50 / 121)
  by_part = profile_step.grouped(durations, profile_step.model_part)
  assert by_part['vision'] == pytest.approx(32 / 121)  # the fusion and both library calls, through op_name
  assert by_part['unattributed (library kernels in CUDA graphs)'] == pytest.approx(89 / 121)


@pytest.mark.slow  # compiles the micro train step
def test_a_traced_micro_step_is_attributed_to_every_part_both_ways():
  result = profile_step.profile(micro_config(), steps=1, warmup=1, timed=1)
  assert sum(result['by_class'].values()) == pytest.approx(1.0)
  assert result['by_class'].get('matmul or convolution', 0) > 0  # shares at this size are noise: only presence
  for part in ('vision', 'text', 'fusion'):
    assert result['by_part'].get(part, 0) > 0 and result['by_part'].get(f'{part} backward', 0) > 0, part
  assert result['traced_ms_per_step'] > 0 and result['step_s'] > 0
  assert sum(row['ms_per_step'] for row in result['top']) == pytest.approx(result['traced_ms_per_step'])
  text = profile_step.report(result, top=5)
  assert 'by class' in text and 'by model part' in text and text.count('\n') >= 10


def test_the_benchmarks_command_line_loads_the_config_with_overrides_and_names_unknown_flags(capsys):
  import config_args  # noqa: E402  (benchmarks/, on the path above)
  parser = config_args.parser('test', 'configs/shapes.py')
  parser.add_argument('--steps', type=int, default=2)
  args, config = config_args.parse(parser, ['--config', str(ROOT / 'tests' / 'micro_config.py'), '--steps', '3',
                                            '--config.optim.warmup_steps=5'])
  assert args.steps == 3 and config.optim.warmup_steps == 5
  with pytest.raises(SystemExit):
    config_args.parse(parser, ['--config', str(ROOT / 'tests' / 'micro_config.py'), '--stpes', '3'])
  assert '--stpes' in capsys.readouterr().err
