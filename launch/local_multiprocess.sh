#!/usr/bin/env bash
# Runs the main job as N processes on this machine, joined by jax.distributed with a 127.0.0.1 coordinator
# (CPU devices talk through gloo collectives). For testing multi-host code paths without a cluster.
#
# Usage: launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- MAIN_FLAGS...
#   launch/local_multiprocess.sh -n 2 -- --config configs/digits.py --workdir /tmp/vit_2proc
#
# Each process logs to LOG_DIR/process_<i>.log (default: the current directory); the script exits
# non-zero when any process fails, after printing the end of that process's log, and with 75 when the run
# was preempted (a SIGTERM to this script or to any process: each saved a checkpoint; rerun to resume).
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

num_processes=2
devices_per_process=1
port=""
log_dir="."
while getopts "n:d:p:l:h" option; do
  case "${option}" in
    n) num_processes="${OPTARG}" ;;
    d) devices_per_process="${OPTARG}" ;;
    p) port="${OPTARG}" ;;
    l) log_dir="${OPTARG}" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "error: give the main job's flags after --, e.g. -- --config configs/digits.py --workdir DIR" >&2
  exit 2
fi
if [[ -z "${port}" ]]; then  # A free port, chosen by the kernel.
  port=$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
mkdir -p "${log_dir}"

pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}" \
    "${PYTHON}" -m vit_jax.main --coordinator_address="127.0.0.1:${port}" --num_processes="${num_processes}" \
      --process_id="${i}" "$@" >"${log_dir}/process_${i}.log" 2>&1 &
  pids+=($!)
done

# A SIGTERM to the launcher (a scheduler stopping the job) reaches every process: each saves and stops.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM

status=0
preempted=0
for ((i = 0; i < num_processes; i++)); do
  code=0
  while true; do
    wait "${pids[i]}" && code=0 || code=$?
    # wait returns early (status > 128) when the trap runs; the process itself is still going.
    if kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    break
  done
  if [[ ${code} -eq 75 ]]; then
    preempted=1
  elif [[ ${code} -ne 0 ]]; then
    # The cause in a line when the log has one (ours, or JAX's for a lost coordinator), else the log's end.
    cause=$(grep -E '^Error: |Terminating process because' "${log_dir}/process_${i}.log" | tail -n 3 || true)
    if [[ -n "${cause}" ]]; then
      echo "process ${i} failed (exit ${code}): ${cause}" >&2
    else
      echo "process ${i} failed (exit ${code}); end of ${log_dir}/process_${i}.log:" >&2
      tail -n 30 "${log_dir}/process_${i}.log" >&2
    fi
    status=1
  fi
done
if [[ ${status} -ne 0 ]]; then
  echo "after fixing the cause, rerun the same command: the run resumes from its newest checkpoint" >&2
fi
if [[ ${status} -eq 0 && ${preempted} -eq 1 ]]; then
  echo "preempted: every process saved a checkpoint and stopped; rerun the same command to resume" >&2
  exit 75
fi
[[ ${status} -eq 0 ]] && echo "all ${num_processes} processes finished; logs in ${log_dir}/process_*.log"
exit "${status}"
