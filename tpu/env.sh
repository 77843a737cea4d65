#!/usr/bin/env bash
# Settings shared by the tpu/*.sh scripts. Override any of them in the
# environment, e.g.  TPU_NAME=my-slice ACCELERATOR=v4-32 ./tpu/create.sh
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-rlhf-jax}"
ACCELERATOR="${ACCELERATOR:-v4-8}"            # v4-8 = 1 host; v4-32 = 4 hosts; v5litepod-16 = 4 hosts
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"                             # 1 = spot (preemptible) capacity
REMOTE_DIR="${REMOTE_DIR:-rlhf_jax}"          # checkout location on every worker (relative to ~)
BUCKET="${BUCKET:-}"                          # optional gs://bucket mounted on every worker
MOUNT="${MOUNT:-/mnt/rlhf_jax}"               # where BUCKET is mounted (shared run directory)

if [[ -z "${PROJECT}" ]]; then
  echo "error: set PROJECT or run 'gcloud config set project <id>'" >&2
  exit 1
fi

# All workers of the slice at once.
tpu_ssh_all() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" \
    --project="${PROJECT}" --zone="${ZONE}" --worker=all --command="$1"
}
