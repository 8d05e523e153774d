#!/usr/bin/env bash
# Several nodes: run the same command on every node (same HOST:PORT, reachable from all of them):
#   scripts/dist_train_multinode.sh NNODES NPROC_PER_NODE HOST:PORT --config FILE [--resume auto] [KEY=VALUE ...]
# The c10d rendezvous assigns ranks; output_dir must be on a filesystem every node sees (rank 0 writes it, every
# rank reads the teacher and resume checkpoints from it). torchrun is started through the Python in $PYTHON (default:
# `python` on PATH): PYTHON=/path/to/venv/bin/python works without activating that environment.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 NNODES NPROC_PER_NODE HOST:PORT --config FILE [--resume PATH|auto] [KEY=VALUE ...]" >&2
  exit 2
fi
nnodes=$1 nproc=$2 endpoint=$3
shift 3
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="${RDZV_ID:-ctkd}" \
  train.py "$@"
