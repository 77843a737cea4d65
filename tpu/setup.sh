#!/usr/bin/env bash
# Copies this checkout to every worker and installs it with the TPU extra.
# With BUCKET set, also mounts it (gcsfuse) at MOUNT on every worker, so all
# hosts see one run directory (multi-host checkpoints need shared storage).
#   BUCKET=gs://my-bucket ./tpu/setup.sh
set -euo pipefail
# shellcheck source=tpu/env.sh
source "$(dirname "$0")/env.sh"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -t rlhf_jax.XXXXXX).tar.gz"
trap 'rm -f "${archive}"' EXIT

tar -C "${repo_root}" -czf "${archive}" \
  --exclude='.venv*' --exclude='.git' --exclude='runs' --exclude='__pycache__' .

gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:~/rlhf_jax.tar.gz" \
  --project="${PROJECT}" --zone="${ZONE}" --worker=all

tpu_ssh_all "set -euo pipefail
  rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR}
  tar -xzf ~/rlhf_jax.tar.gz -C ~/${REMOTE_DIR}
  python3 -m venv ~/${REMOTE_DIR}/.venv
  ~/${REMOTE_DIR}/.venv/bin/pip install --upgrade pip
  ~/${REMOTE_DIR}/.venv/bin/pip install -e ~/${REMOTE_DIR}'[tpu]' \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  ~/${REMOTE_DIR}/.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"

if [[ -n "${BUCKET}" ]]; then
  bucket_name="${BUCKET#gs://}"
  tpu_ssh_all "set -euo pipefail
    if ! command -v gcsfuse >/dev/null; then
      export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
      echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs ${bucket_name} ${MOUNT}"
fi
echo "installed on every worker of ${TPU_NAME}"
