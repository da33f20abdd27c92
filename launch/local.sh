#!/usr/bin/env bash
# Runs an experiment on this machine, resuming if WORKDIR already has checkpoints.
#
#   launch/local.sh configs/r2d2_digits.py /tmp/r2d2_jax/r2d2_digits [--config.key=value ...]
#
# FAKE_DEVICES=N splits the CPU into N devices (to try the sharded code paths
# on a laptop): FAKE_DEVICES=4 launch/local.sh configs/r2d2_digits.py:runlocal /tmp/wd
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:variant] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
  export JAX_PLATFORMS=cpu
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$(dirname "$0")/.."
exec python -m r2d2_jax.main --config "$config" --workdir "$workdir" "$@"
