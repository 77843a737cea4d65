#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (one or many hosts).
#   ACCELERATOR=v4-32 TPU_NAME=rlhf-jax ./tpu/create.sh
set -euo pipefail
# shellcheck source=tpu/env.sh
source "$(dirname "$0")/env.sh"

extra=()
if [[ "${SPOT}" == "1" ]]; then
  extra+=(--spot)
fi

echo "creating ${TPU_NAME}: ${ACCELERATOR} (${RUNTIME_VERSION}) in ${ZONE}, project ${PROJECT}"
gcloud compute tpus tpu-vm create "${TPU_NAME}" \
  --project="${PROJECT}" \
  --zone="${ZONE}" \
  --accelerator-type="${ACCELERATOR}" \
  --version="${RUNTIME_VERSION}" \
  ${extra[@]+"${extra[@]}"}

gcloud compute tpus tpu-vm describe "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
  --format="value(state,networkEndpoints[].ipAddress)"
