#!/usr/bin/env bash
# Runs `xmodal train` on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config configs/NAME.py --workdir gs://BUCKET/runs/NAME [--config.a.b=v ...]
#
# Copies this working tree to ~/xmodal on all workers, installs it with jax[tpu], then starts training on all
# workers at once (`--worker=all`). XMODAL_DISTRIBUTED=auto lets jax.distributed.initialize find the pod's
# coordinator and process ids from the TPU metadata server. The workdir must be on GCS (or a filesystem mounted on
# every worker): each worker writes its shards of every checkpoint.
#
# Environment: PROJECT (default: gcloud's configured project), SKIP_INSTALL=1 to reuse the previous install.
# Preemption: a preempted TPU VM gets SIGTERM; the loop checkpoints and exits. Rerun the same command to resume.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '4p' "$0" | sed 's/^# *//'
  exit 2
fi
name="$1"
zone="$2"
shift 2
[[ "${1:-}" == "--" ]] && shift
gcloud_tpu=(gcloud compute tpus tpu-vm --zone="$zone" ${PROJECT:+--project="$PROJECT"})

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  archive="$(mktemp -d)/xmodal.tar.gz"
  tar -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=.venv --exclude=logs -czf "$archive" .
  "${gcloud_tpu[@]}" scp "$archive" "$name":/tmp/xmodal.tar.gz --worker=all
  "${gcloud_tpu[@]}" ssh "$name" --worker=all --command="
    set -e
    rm -rf ~/xmodal && mkdir -p ~/xmodal && tar -C ~/xmodal -xzf /tmp/xmodal.tar.gz
    python3 -m venv ~/xmodal-venv
    ~/xmodal-venv/bin/pip install -q -U pip
    ~/xmodal-venv/bin/pip install -q -U 'jax[tpu]' -e ~/xmodal'[data]'
  "
fi

# printf %q: the training arguments reach the remote shell exactly as given here.
args="$(printf '%q ' "$@")"
"${gcloud_tpu[@]}" ssh "$name" --worker=all --command="
  cd ~/xmodal && XMODAL_DISTRIBUTED=auto ~/xmodal-venv/bin/xmodal train $args 2>&1 | tee -a ~/xmodal-train.log
"
