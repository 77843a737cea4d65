#!/usr/bin/env bash
# Launches one run on every worker of the slice (in the background, logging to
# ~/<REMOTE_DIR>/<name>.log on each worker). Extra arguments go to experiments.run.
#   ./tpu/launch.sh --config=sft.py --config.sft.steps=1000
#   WORKDIR=/mnt/rlhf_jax/runs/sft ./tpu/launch.sh --config=sft.py
set -euo pipefail
# shellcheck source=tpu/env.sh
source "$(dirname "$0")/env.sh"

if [[ $# -eq 0 ]]; then
  echo "usage: $0 --config=<name> [--config.a.b=v ...]" >&2
  exit 2
fi
run_name="${RUN_NAME:-run-$(date +%Y%m%d-%H%M%S)}"
workdir="${WORKDIR:-${MOUNT}/runs/${run_name}}"

# Quote every argument for the remote shell.
args=""
for arg in "$@"; do
  args+=" $(printf '%q' "${arg}")"
done

tpu_ssh_all "cd ~/${REMOTE_DIR} && \
  nohup .venv/bin/python -m experiments.run${args} --workdir=$(printf '%q' "${workdir}") --multihost \
  > ~/${REMOTE_DIR}/${run_name}.log 2>&1 < /dev/null &
  echo \"worker \$(hostname): started ${run_name}\""

echo "follow worker 0 with:"
echo "  gcloud compute tpus tpu-vm ssh ${TPU_NAME} --project=${PROJECT} --zone=${ZONE} --worker=0 --command='tail -f ~/${REMOTE_DIR}/${run_name}.log'"
