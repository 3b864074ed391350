#!/bin/bash
# lmforge prepare on a running Ray cluster, submitted as a Ray job.
#
#   RAY_ADDRESS=http://HEAD:8265 examples/ray_prepare_job.sh s3://bucket/raw/ s3://bucket/shards/run1 runs/tok
#
# The job's driver runs on the cluster (`--ray-address auto` joins it); `--working-dir .` ships this
# checkout (and the tokenizer dir, when it lies inside it) to the cluster; the runtime env installs
# lmforge's Ray and cloud extras on every node. Inputs and output are object-store URLs every node can
# read; the nodes need their own credentials (instance roles, or AWS_* / GOOGLE_* in the runtime env).
set -euo pipefail
INPUT=${1:?usage: examples/ray_prepare_job.sh INPUT_URL OUT_URL TOKENIZER_DIR [prepare flags ...]}
OUT=${2:?usage: examples/ray_prepare_job.sh INPUT_URL OUT_URL TOKENIZER_DIR [prepare flags ...]}
TOK=${3:?usage: examples/ray_prepare_job.sh INPUT_URL OUT_URL TOKENIZER_DIR [prepare flags ...]}
shift 3
exec ray job submit \
  --address "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard URL of the cluster, e.g. http://head:8265}" \
  --working-dir . \
  --runtime-env-json '{"pip": ["lmforge[ray,cloud]"], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}' \
  -- python -m lmforge prepare --input "$INPUT" --tokenizer "$TOK" --out "$OUT" \
     --engine ray --ray-address auto --dedup near --val-fraction 0.001 --no-progress "$@"
