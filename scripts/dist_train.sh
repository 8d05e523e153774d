#!/usr/bin/env bash
# One node, N processes (one per GPU; gloo on CPU):
#   scripts/dist_train.sh NPROC --config FILE [--resume auto] [KEY=VALUE ...]
# data.batch_size stays the global batch: each process takes batch_size / NPROC of every batch.
# torch's launcher (torchrun) is started through the Python in $PYTHON (default: `python` on PATH), so a virtual
# environment need not be activated: PYTHON=/path/to/venv/bin/python scripts/dist_train.sh ...
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC --config FILE [--resume PATH|auto] [KEY=VALUE ...]" >&2
  exit 2
fi
nproc=$1
shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" train.py "$@"
