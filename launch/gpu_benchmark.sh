#!/usr/bin/env bash
# The comparison on one GPU: ViT-B/16 and ViT-L/16, train step and inference, batch 256, 224px, bf16; ours
# against timm eager and timm + torch.compile on the same GPU. Writes OUT_DIR/gpu_benchmark.json and
# OUT_DIR/gpu_benchmark.md (the table for BENCHMARKS.md), rewritten after every row, so a run cut short
# keeps what finished; a row whose worker (compile included) runs past WORKER_TIMEOUT seconds is recorded as
# timed out and the run goes on.
#
# Usage: launch/gpu_benchmark.sh [OUT_DIR]     (default: ./gpu_benchmark)
#   VARIANTS=ViT-B/16 REPEATS=20 launch/gpu_benchmark.sh /tmp/out
#
# Needs jax with its CUDA plugin, flax, optax, torch with CUDA and timm; TensorFlow is not needed (the model
# rows never import it). ml_collections, if missing, is installed from WHEELS (a folder of wheels) or PyPI.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
out_dir="${1:-gpu_benchmark}"
mkdir -p "${out_dir}"
PYTHON="${PYTHON:-python3}"

if ! "${PYTHON}" -c 'import ml_collections' 2>/dev/null; then
  site="$(mktemp -d)"
  if [ -n "${WHEELS:-}" ]; then
    "${PYTHON}" -m pip install -q --no-index --no-deps --target "${site}" "${WHEELS}"/ml_collections-*.whl
  else
    "${PYTHON}" -m pip install -q --no-deps --target "${site}" ml_collections
  fi
  export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
fi
"${PYTHON}" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()' || {
  echo "Error: JAX sees no GPU (jax.devices() above): install jax with its CUDA plugin." >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "${out_dir}/gpu.txt" || true
"${PYTHON}" -c 'import jax, flax, torch, timm; print(f"jax {jax.__version__}, flax {flax.__version__}, "
                f"torch {torch.__version__}, timm {timm.__version__}")' >> "${out_dir}/gpu.txt"

# Each row runs in its own process (one library per process): every worker has the whole GPU.
export PYTHONUNBUFFERED=1
"${PYTHON}" -m vit_jax.benchmark --variants="${VARIANTS:-ViT-B/16,ViT-L/16}" --image_sizes=224 \
    --batch_sizes="${BATCH:-256}" --dtype=bfloat16 --modes=train,inference --compare=timm,timm_compile \
    --repeats="${REPEATS:-10}" --warmup=2 --worker_timeout="${WORKER_TIMEOUT:-150}" \
    --json="${out_dir}/gpu_benchmark.json" --table="${out_dir}/gpu_benchmark.md" 2>&1 | tee "${out_dir}/log.txt"
