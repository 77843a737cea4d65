#!/usr/bin/env bash
# Stops experiments.run on every worker (the slice stays up).
set -euo pipefail
# shellcheck source=tpu/env.sh
source "$(dirname "$0")/env.sh"

tpu_ssh_all "pids=\$(pgrep -u \$(id -u) -f '[e]xperiments.run' || true); \
  if [ -n \"\$pids\" ]; then kill \$pids; echo \"\$(hostname): stopped \$pids\"; \
  else echo \"\$(hostname): nothing running\"; fi"
