#!/usr/bin/env bash
# A/B of code variants on the GPU bench (docs/performance.md, "H200: the profile, and three fixes"): each variant is
# a copy of xmodal/ and configs/ in .variants/NAME (a folder .git/info/exclude ignores, carried to the device
# machine), benched in its own process, in the order given — name each variant twice for A B A B.
#
#   launch/gpu_ab.sh OUT_DIR old new old new      # after launch/gpu_bench.sh has installed the carried wheels
#
# Settings: base at RES (256) px, BATCH (256), remat dots_no_batch, ATTN (cudnn), STEPS (15), OVERRIDES (more
# --config flags), VARIANT_TIMEOUT (100 s). Logs go to /tmp/ablogs (the device tool brings back 8 files at most);
# each variant's summary line is appended to OUT_DIR/results.jsonl.
set -uo pipefail

out=$1; shift
logs=/tmp/ablogs
mkdir -p "$out" "$logs"
for name in "$@"; do
  log="$logs/$name.$SECONDS.log"
  # -c, not -m: `python3 -m` would put the working directory, not the variant, first on the path.
  # shellcheck disable=SC2086  # OVERRIDES is meant to split
  (cd ".variants/$name" && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "${VARIANT_TIMEOUT:-100}" python3 -c \
      'import sys; from xmodal.cli.main import main; sys.exit(main(sys.argv[1:]))' bench \
      --config "configs/albef.py:res=${RES:-256}" --steps "${STEPS:-15}" --config.data.batch_size="${BATCH:-256}" \
      --config.model.remat=dots_no_batch --config.model.attention="${ATTN:-cudnn}" ${OVERRIDES:-} >"$log" 2>&1)
  rc=$?
  echo "== $name rc=$rc"
  if [[ $rc == 0 ]]; then
    tail -n 1 "$log" | python3 -c "import json, sys; r = json.load(sys.stdin); print(json.dumps({'variant': '$name', \
**{k: r[k] for k in ('batch', 'step_s', 'step_s_min', 'examples_per_s', 'mfu', 'peak_memory_bytes', 'compile_s')}}))" \
        | tee -a "$out/results.jsonl"
  else
    tail -n 12 "$log"
  fi
done
