#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, installs vit_jax on every worker and runs the main job on all of them at once.
# Every worker runs the same command; jax.distributed finds the others by itself on TPU VMs.
#
# Usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR_TYPE CONFIG WORKDIR [MAIN_FLAGS...]
#   launch/tpu_vm.sh vit-l16 us-central2-b v4-64 configs/vit_l16.py gs://my-bucket/vit_l16 \
#       --config.data_dir=gs://my-bucket/tensorflow_datasets
#
# WORKDIR and the data_dir must be gs:// paths that every worker can read and write. Environment:
#   RUNTIME_VERSION  TPU VM software image; by default the one Cloud TPU names for the accelerator type:
#                    v2/v3/v4 tpu-ubuntu2204-base, v5e (v5litepod-*) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                    v6e v2-alpha-tpuv6e
#   COMMIT           the commit of this checkout to run (default HEAD): shipped to every worker as a
#                    `git archive` (uncommitted changes are not: commit them), installed into a Python 3.11
#                    virtualenv under launch/constraints.txt's pins, and recorded in the workdir
#   SPOT=1           create a spot slice (cheaper; reclaimed at any time)
#   QUEUED=1         ask for the slice as a queued resource (waits for capacity instead of failing; the way
#                    large and spot slices are granted); polled every POLL_SECONDS (default 60) until ACTIVE
#   PLAN=1           first compile the job for the accelerator type here (python -m vit_jax.plan, with the
#                    --config.* flags given; needs the tpu extra) and refuse, before anything is created, a
#                    config that does not fit its chips, naming the settings that do. PYTHON: the interpreter
#                    (default python3)
#   RECREATE=1       a slice NAME that was reclaimed (SUSPENDED, PREEMPTED) is deleted and created again;
#                    without it the script stops and says so. A live slice NAME is reused; SKIP_CREATE=1
#                    never creates. AUTOCHECKPOINT=0 leaves Cloud TPU's maintenance warning off.
# On each worker the job is a systemd service (vit_jax.service): it starts now and at every boot, and again 2
# minutes after a preemption (exit 75: SIGTERM, its step saved) if the host is still up; it resumes from the
# workdir. A reclaimed spot slice takes the job with it: run this script again (RECREATE=1) and it resumes.
# Logs: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f ~/vit_jax.log' (appended
# to by each attempt; every worker's is copied to WORKDIR/logs/HOSTNAME.log when an attempt ends).
# Delete the slice when done: gcloud compute tpus tpu-vm delete NAME --zone ZONE, or for a queued resource
# gcloud compute tpus queued-resources delete NAME --zone ZONE --force (the script prints the one to use).
set -euo pipefail

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 5 ]]; then usage >&2; exit 2; fi

name="$1"; zone="$2"; accelerator_type="$3"; config="$4"; workdir="$5"; shift 5
# The software image per TPU generation (https://cloud.google.com/tpu/docs/runtimes).
case "${accelerator_type}" in
  v2-*|v3-*|v4-*) default_runtime=tpu-ubuntu2204-base ;;
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime= ;;
esac
runtime_version="${RUNTIME_VERSION:-${default_runtime}}"
if [[ -z "${runtime_version}" ]]; then
  echo "error: unknown accelerator type ${accelerator_type}: give one like v4-32, v5litepod-16, v5p-128, v6e-64," \
       "or set RUNTIME_VERSION to its software image" >&2
  exit 2
fi
echo "accelerator ${accelerator_type}: runtime version ${runtime_version}${RUNTIME_VERSION:+ (RUNTIME_VERSION)}" >&2
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! commit=$(git -C "${root}" rev-parse --short=12 "${COMMIT:-HEAD}^{commit}" 2> /dev/null); then
  echo "error: ${COMMIT:-HEAD} is not a commit of ${root}: the launcher ships a commit of this checkout" >&2
  exit 2
fi
if [[ -z "${COMMIT:-}" && -n "$(git -C "${root}" status --porcelain --untracked-files=no)" ]]; then
  echo "warning: uncommitted changes in ${root} are not shipped; the workers run commit ${commit}" >&2
fi
if [[ "${workdir}" != gs://* ]]; then
  echo "error: WORKDIR must be a gs:// path shared by all workers, got ${workdir}" >&2
  exit 2
fi

if [[ "${PLAN:-0}" == "1" ]]; then
  # Only the config's flags concern the compiled step; the job's others (--distributed, ...) are main's.
  config_flags=()
  for flag in "$@"; do [[ "${flag}" == --config.* ]] && config_flags+=("${flag}"); done
  echo "planning ${config} on ${accelerator_type} (PLAN=1): compiling its steps here" >&2
  if ! (cd "${root}" && "${PYTHON:-python3}" -m vit_jax.plan --config="${config}" --topology="${accelerator_type}" \
          ${config_flags[@]+"${config_flags[@]}"} >&2); then
    echo "error: the plan above refuses ${config} on ${accelerator_type}: nothing was created. Give the" \
         "settings it names (or a larger slice), or run without PLAN=1" >&2
    exit 2
  fi
fi

spot=()
[[ "${SPOT:-0}" == "1" ]] && spot=(--spot)
# Maintenance: with Autocheckpoint Cloud TPU sends SIGTERM before it maintains a host, and the job saves its
# step and exits 75; without it the host goes down unwarned (https://cloud.google.com/tpu/docs/autocheckpoint:
# v2-v4 and v5e).
autocheckpoint=()
case "${accelerator_type}" in
  v2-*|v3-*|v4-*|v5litepod-*|v5e-*) [[ "${AUTOCHECKPOINT:-1}" == "1" ]] && autocheckpoint=(--autocheckpoint-enabled) ;;
esac
if [[ "${QUEUED:-0}" == "1" ]]; then
  state_of() { gcloud compute tpus queued-resources describe "${name}" --zone="${zone}" --format='value(state.state)' 2> /dev/null || true; }
  delete=(gcloud compute tpus queued-resources delete "${name}" --zone="${zone}" --force --quiet)
  lost_states=" SUSPENDED FAILED "  # A reclaimed spot slice's queued resource stays SUSPENDED.
else
  state_of() { gcloud compute tpus tpu-vm describe "${name}" --zone="${zone}" --format='value(state)' 2> /dev/null || true; }
  delete=(gcloud compute tpus tpu-vm delete "${name}" --zone="${zone}" --quiet)
  lost_states=" PREEMPTED TERMINATED "
fi

if [[ "${SKIP_CREATE:-0}" != "1" ]]; then
  state=$(state_of)
  if [[ -n "${state}" && "${lost_states}" == *" ${state} "* ]]; then
    if [[ "${RECREATE:-0}" != "1" ]]; then
      echo "error: ${name} exists but is ${state} (a reclaimed spot slice stays so): rerun with RECREATE=1 to" \
           "delete and create it again; the job resumes from ${workdir}" >&2
      exit 2
    fi
    echo "${name} is ${state}: deleting it and creating it again (RECREATE=1)" >&2
    "${delete[@]}"
    state=
  fi
  if [[ -n "${state}" ]]; then
    echo "reusing ${name} (${state})" >&2
  elif [[ "${QUEUED:-0}" == "1" ]]; then
    gcloud compute tpus queued-resources create "${name}" --node-id="${name}" --zone="${zone}" \
      --accelerator-type="${accelerator_type}" --runtime-version="${runtime_version}" \
      ${spot[@]+"${spot[@]}"} ${autocheckpoint[@]+"${autocheckpoint[@]}"}
  else
    gcloud compute tpus tpu-vm create "${name}" --zone="${zone}" --accelerator-type="${accelerator_type}" \
      --version="${runtime_version}" ${spot[@]+"${spot[@]}"} ${autocheckpoint[@]+"${autocheckpoint[@]}"}
  fi
  while [[ "${QUEUED:-0}" == "1" ]]; do
    state=$(state_of)
    [[ "${state}" == ACTIVE ]] && break
    if [[ "${lost_states}" == *" ${state} "* ]]; then
      echo "error: queued resource ${name} is ${state}: gcloud compute tpus queued-resources describe ${name}" >&2
      exit 1
    fi
    echo "queued resource ${name}: ${state}; waiting for capacity" >&2
    sleep "${POLL_SECONDS:-60}"
  done
fi

# The code: one commit, the same on every worker, whatever the origin has (or whether the workers can reach
# it). A rerun of the same commit reuses its folder and virtualenv.
archive="$(mktemp -d)/vit_jax_${commit}.tar.gz"
git -C "${root}" archive --format=tar.gz -o "${archive}" "${commit}"
gcloud compute tpus tpu-vm scp "${archive}" "${name}:vit_jax_${commit}.tar.gz" --zone="${zone}" --worker=all
echo "shipped commit ${commit} to every worker of ${name}" >&2

# One attempt of the job on a worker, run by systemd (below): written here, shipped with the code.
main_flags=$(printf ' %q' --config="${config}" --workdir="${workdir}" --distributed=yes "$@")
run_script="$(dirname "${archive}")/vit_jax_run.sh"
cat > "${run_script}" << RUN
#!/usr/bin/env bash
# Written by launch/tpu_vm.sh: one attempt of the main job (commit ${commit}), run by vit_jax.service.
cd "\$HOME/vit_jax_src/${commit}"
export VIT_JAX_COMMIT=${commit}
echo "=== \$(hostname) \$(date -u): vit_jax.main, commit ${commit} ==="
"\$HOME/vit_jax_venv/bin/python" -m vit_jax.main${main_flags}
status=\$?
gcloud storage cp "\$HOME/vit_jax.log" "${workdir}/logs/\$(hostname).log" > /dev/null 2>&1 || true
exit \$status
RUN
gcloud compute tpus tpu-vm scp "${run_script}" "${name}:vit_jax_run.sh" --zone="${zone}" --worker=all

# Every worker: the code unpacked, a Python 3.11 virtualenv (the image's python3 is 3.10 on
# tpu-ubuntu2204-base, too old for jax) with the pinned install, and the job as a systemd service: started now,
# at every boot (a host back from maintenance resumes the job), and again 2 minutes after any exit but success,
# a bug (1), a user error (2) or Ctrl-C (130): a preempted job (75) on a host that stays up resumes.
gcloud compute tpus tpu-vm ssh "${name}" --zone="${zone}" --worker=all --command "
  set -e
  src=~/vit_jax_src/${commit}
  [ -d \$src ] || { mkdir -p \$src.tmp && tar -xzf ~/vit_jax_${commit}.tar.gz -C \$src.tmp && mv \$src.tmp \$src; }
  if [ ! -x ~/vit_jax_venv/bin/python ]; then
    command -v python3.11 > /dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; }
    python3.11 -m venv ~/vit_jax_venv
  fi
  ~/vit_jax_venv/bin/python -m pip install -q -c \$src/launch/constraints.txt -e \$src[tpu] \\
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  printf '%s\n' '[Unit]' 'Description=vit_jax main job (launch/tpu_vm.sh)' 'Wants=network-online.target' \\
    'After=network-online.target' '[Service]' \"User=\$(id -un)\" \"Environment=HOME=\$HOME\" \\
    \"ExecStart=/bin/bash \$HOME/vit_jax_run.sh\" \"StandardOutput=append:\$HOME/vit_jax.log\" \\
    'StandardError=inherit' 'Restart=on-failure' 'RestartSec=120' 'RestartPreventExitStatus=1 2 130' \\
    '[Install]' 'WantedBy=multi-user.target' | sudo tee \${SYSTEMD_UNIT_DIR:-/etc/systemd/system}/vit_jax.service > /dev/null
  sudo systemctl daemon-reload
  sudo systemctl enable vit_jax.service
  sudo systemctl restart vit_jax.service
"
if [[ "${QUEUED:-0}" == "1" ]]; then
  delete_hint="gcloud compute tpus queued-resources delete ${name} --zone=${zone} --force"
else
  delete_hint="gcloud compute tpus tpu-vm delete ${name} --zone=${zone}"
fi
echo "started on every worker of ${name} (systemd: vit_jax.service); progress: worker 0's ~/vit_jax.log (each" \
     "worker's is copied to ${workdir}/logs/ after each attempt), TensorBoard: ${workdir}. When done: ${delete_hint}"
