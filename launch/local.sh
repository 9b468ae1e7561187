#!/usr/bin/env bash
# Runs N processes of `xmodal train` on this machine as one multi-process JAX run (CPU collectives over gloo).
#
#   launch/local.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- TRAIN_ARGS...
#   launch/local.sh -n 2 -d 4 -- --config configs/tiny.py --workdir /tmp/xmodal-run
#
# Each process gets XMODAL_COORDINATOR=127.0.0.1:PORT, XMODAL_NUM_PROCESSES and XMODAL_PROCESS_ID (read by
# xmodal.distributed.initialize) and, with -d, XLA_FLAGS for that many fake CPU devices. Process i logs to
# LOG_DIR/process_<i>.log; process 0 is also echoed to the console. If one process fails, the others get SIGTERM
# (they checkpoint if they can), then SIGKILL after KILL_GRACE seconds (default 30): a collective step or save with a
# dead peer would otherwise wait for the heartbeat timeout. SIGINT/SIGTERM to this script is forwarded to all.
# The exit status is the first failure's, or 0.
#
# Environment: XMODAL_CMD replaces the command (default `xmodal train`), e.g. XMODAL_CMD="python -m xmodal.cli train".
set -euo pipefail

processes=2
devices=""
port=""
log_dir=""
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift

# A free port from the kernel (a fixed one collides with a second run on the same machine).
port="${port:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log_dir="${log_dir:-logs/local-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$log_dir"
read -r -a command <<< "${XMODAL_CMD:-xmodal train}"
grace="${KILL_GRACE:-30}"

declare -a pids=()
stop_all() {  # SIGTERM the survivors, then SIGKILL whoever is still there after the grace period.
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace; t++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "local.sh: interrupted, stopping all processes" >&2; stop_all; exit 130' INT TERM

echo "local.sh: $processes processes, coordinator 127.0.0.1:$port, logs in $log_dir" >&2
for ((i = 0; i < processes; i++)); do
  log="$log_dir/process_$i.log"
  env_vars=(XMODAL_COORDINATOR="127.0.0.1:$port" XMODAL_NUM_PROCESSES="$processes" XMODAL_PROCESS_ID="$i")
  if [[ -n "$devices" ]]; then
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices")
  fi
  if ((i == 0)); then
    env "${env_vars[@]}" "${command[@]}" "$@" > >(tee "$log") 2>&1 &
  else
    env "${env_vars[@]}" "${command[@]}" "$@" > "$log" 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`: we need to know which process ended, and bash < 5.1 cannot say.
status=0
declare -A done_=()
while ((${#done_[@]} < processes)); do
  for i in "${!pids[@]}"; do
    [[ -n "${done_[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    done_[$i]=1
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process $i exited with status $rc (log: $log_dir/process_$i.log); stopping the others" >&2
      stop_all
    fi
  done
  sleep 0.5
done
exit "$status"
