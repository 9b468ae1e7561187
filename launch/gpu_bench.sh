#!/usr/bin/env bash
# The GPU figure of the performance issue: `xmodal bench` of the `base` preset at 256 px in bfloat16, several
# variants in one go, one process each (a failed variant does not stop the others).
#
#   launch/gpu_bench.sh [OUT_DIR]
#
# Runs from the repository root on a machine with one NVIDIA GPU and a CUDA jax already installed; xmodal itself
# is used from the working tree (PYTHONPATH), so nothing is installed but what `.whl/` carries (ml-collections,
# and flax 0.12.x when the machine's flax is another minor version). Each variant's log goes to OUT_DIR/NAME.log,
# and its JSON line (the bench's last line) to OUT_DIR/results.jsonl. VARIANTS (names, space-separated) runs a subset.
set -uo pipefail

out=${1:-${OUT:-/tmp/xmodal-gpu-bench}}
mkdir -p "$out"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit
fi
if ! python3 -c 'import flax, sys; sys.exit(not flax.__version__.startswith("0.12."))' \
    && compgen -G '.whl/flax/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/flax/*.whl || exit
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
python3 -c 'import jax, flax, optax, chex; print("jax", jax.__version__, "flax", flax.__version__, "optax",
optax.__version__, "chex", chex.__version__, jax.devices())' | tee -a "$out/gpu.txt"

# Every variant is the `base` preset's own setting (batch 256, remat of everything but batched matmuls, cuDNN
# attention) with the overrides and environment below; a later override wins.
common='--config.data.batch_size=256 --config.model.remat=dots_no_batch --config.model.attention=cudnn'
declare -A overrides=(
  [b256_cudnn_remat]=''
  [b256_cudnn]='--config.model.remat=none'
  # The XLA attention materialises float32 logits: without remat batch 256 asks for 72 GiB on an 80 GB H100.
  [b256_xla_remat]='--config.model.attention=xla'
  # Unscanned layers compile for over 90 s (the H100 machine's 16 cores); batch 512 without remat asks for 114 GiB.
  [b256_cudnn_remat_unscanned]='--config.model.scan_layers=False'
  [b256_cudnn_remat_cublas]=''
  [b128_cudnn]='--config.data.batch_size=128 --config.model.remat=none'
  # Twice the batch with base's remat (23.7 GB at 256): the same kernels on twice the rows.
  [b512_cudnn_remat]='--config.data.batch_size=512'
)
declare -A env=(
  [b256_cudnn_remat_cublas]='XLA_FLAGS=--xla_gpu_enable_triton_gemm=false'
)
for name in ${VARIANTS:-b256_cudnn_remat b256_cudnn b256_xla_remat b256_cudnn_remat_cublas b128_cudnn}; do
  # shellcheck disable=SC2086  # the arguments are meant to split
  env ${env[$name]:-} timeout "${VARIANT_TIMEOUT:-200}" python3 -m xmodal.cli bench --config configs/albef.py:res=256 \
      --steps "${STEPS:-20}" $common ${overrides[$name]} >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc"
  if [[ $rc == 0 ]]; then
    tail -n 1 "$out/$name.log" | python3 -c "import json, sys; r = json.load(sys.stdin); r['variant'] = '$name'; \
print(json.dumps(r))" | tee -a "$out/results.jsonl"
  else
    tail -n 15 "$out/$name.log"
  fi
done
