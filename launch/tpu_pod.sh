#!/usr/bin/env bash
# Runs an experiment on every worker of a Cloud TPU VM pod slice (v4-32, v5p-64, ...).
#
#   TPU_NAME=my-pod ZONE=us-central2-b WORKDIR=/mnt/shared/r2d2/mpl_imagenet10 \
#     launch/tpu_pod.sh configs/mpl_imagenet10.py [--config.key=value ...]
#
# Every worker runs the same `python -m r2d2_jax.main ...` (one process per
# worker host, driving all of its TPU chips); r2d2_jax.distributed detects the
# pod and calls jax.distributed.initialize(), so no coordinator flags are needed.
# Rerunning the command resumes from the last checkpoint in WORKDIR.
#
# Required environment:
#   TPU_NAME   the TPU VM (pod slice) name, as in `gcloud compute tpus tpu-vm list`
#   ZONE       its zone
#   WORKDIR    where every worker writes: gs://BUCKET/PATH, or a folder every
#              worker sees at the same path (an NFS or Filestore mount). All
#              workers write their shards of each checkpoint there and read
#              the split back.
# Optional:
#   PROJECT    gcloud project (default: gcloud's configured one)
#   REMOTE_DIR where the code goes on the workers (default: r2d2_jax, in $HOME)
#   INSTALL    1 (default): copy this checkout to the workers and pip install it
#              with its tfds and gcs extras and jax[tpu]; 0: only run (the workers already have the code)
#
# ImageNet configs read tensorflow-datasets' prepared data; point every worker
# at the same copy, e.g. --config.data.data_dir=gs://BUCKET/tensorflow_datasets.
set -euo pipefail
usage() {
  sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
fi
missing=()
for var in TPU_NAME ZONE WORKDIR; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: set ${missing[*]} (see the usage below)." >&2
  usage
fi
command -v gcloud >/dev/null || { echo "error: gcloud is not installed." >&2; exit 2; }
config=$1
shift
remote_dir=${REMOTE_DIR:-r2d2_jax}
gcloud_tpu=(gcloud compute tpus tpu-vm)
target=("$TPU_NAME" "--zone=$ZONE" "--worker=all")
if [[ -n "${PROJECT:-}" ]]; then
  target+=("--project=$PROJECT")
fi
cd "$(dirname "$0")/.."

if [[ "${INSTALL:-1}" == "1" ]]; then
  # The tracked and untracked (not ignored) files of this checkout.
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git ls-files -z --cached --others --exclude-standard |
    tar -czf "$archive" --null -T -
  "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:r2d2_jax.tar.gz" \
    "--zone=$ZONE" --worker=all ${PROJECT:+"--project=$PROJECT"}
  "${gcloud_tpu[@]}" ssh "${target[@]}" --command "set -e
    mkdir -p $(printf '%q' "$remote_dir")
    tar -xzf r2d2_jax.tar.gz -C $(printf '%q' "$remote_dir")
    cd $(printf '%q' "$remote_dir")
    python3 -m pip install --quiet --upgrade pip
    python3 -m pip install --quiet -e '.[tfds,gcs]'
    python3 -m pip install --quiet \"jax[tpu]==\$(python3 -c 'import jax; print(jax.__version__)')\""
fi

# One quoted command line, the same on every worker.
run="cd $(printf '%q' "$remote_dir") && TF_CPP_MIN_LOG_LEVEL=2 python3 -m r2d2_jax.main"
run+=" --config $(printf '%q' "$config") --workdir $(printf '%q' "$WORKDIR")"
for arg in "$@"; do
  run+=" $(printf '%q' "$arg")"
done
echo "On every worker of $TPU_NAME: $run" >&2
exec "${gcloud_tpu[@]}" ssh "${target[@]}" --command "$run"
