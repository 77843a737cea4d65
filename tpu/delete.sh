#!/usr/bin/env bash
# Deletes the slice (everything on its disks is lost; runs under BUCKET stay).
set -euo pipefail
# shellcheck source=tpu/env.sh
source "$(dirname "$0")/env.sh"

gcloud compute tpus tpu-vm delete "${TPU_NAME}" \
  --project="${PROJECT}" --zone="${ZONE}" --quiet
