#!/usr/bin/env bash
# Create, install, run, follow and delete a Cloud TPU VM slice for pixelvla_jax training.
#
#   launch/tpu.sh [--dry-run] create     # TPU VM (or a queued resource with QUEUED=1)
#   launch/tpu.sh [--dry-run] install    # copy this checkout to every worker, pip install it
#   launch/tpu.sh [--dry-run] train --config=configs/libero.py [more train flags]
#   launch/tpu.sh [--dry-run] logs       # follow worker 0's training log
#   launch/tpu.sh [--dry-run] delete     # delete the slice (or the queued resource)
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [pixelvla]  ZONE [us-central2-b]  ACCELERATOR [v4-8]  RUNTIME [tpu-ubuntu2204-base]
#   QUEUED [0]  QR_NAME [$TPU_NAME-qr]  PROJECT [gcloud's default]  SPOT [0]
#   WORKDIR   gs://bucket/runs/NAME  (required by `train`: checkpoints and TensorBoard logs)
#   DATA_DIR  gs://bucket/rlds       (required by `train`: TFDS_DATA_DIR on every host)
# v5e: ACCELERATOR=v5litepod-8 RUNTIME=v2-alpha-tpuv5-lite.
# Every host runs the same command; the program calls jax.distributed.initialize() itself.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CMD="${1:-}"
[[ -n "$CMD" ]] || { sed -n '2,18p' "$0"; exit 2; }
shift

TPU_NAME="${TPU_NAME:-pixelvla}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
QUEUED="${QUEUED:-0}"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
SPOT="${SPOT:-0}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")
REMOTE_DIR="pixelvla_jax"
LOG="/tmp/pixelvla_train.log"

run() {
  # Prints every command; executes it unless --dry-run.
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

case "$CMD" in
  create)
    spot=()
    [[ "$SPOT" == 1 ]] && spot=(--spot)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources create "$QR_NAME" --node-id "$TPU_NAME" \
        --zone "$ZONE" "${PROJECT_FLAG[@]}" --accelerator-type "$ACCELERATOR" \
        --runtime-version "$RUNTIME" "${spot[@]}"
      echo "Queued. Watch with: gcloud compute tpus queued-resources describe $QR_NAME --zone $ZONE"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
        --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${spot[@]}"
    fi
    ;;
  install)
    here="$(cd "$(dirname "$0")/.." && pwd)"
    # The tested versions: jax[tpu] at setup.cfg's lower bound for jax, the rest from
    # constraints.txt (libtpu follows from the jax release).
    jax_version="$(sed -n 's/^ *jax>=\([0-9.]*\).*/\1/p' "$here/setup.cfg")"
    [[ -n "$jax_version" ]] || { echo "no 'jax>=' requirement in $here/setup.cfg" >&2; exit 2; }
    run gcloud compute tpus tpu-vm scp --recurse "$here" "$TPU_NAME:~/$REMOTE_DIR" \
      --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
    # The tested jax and numpy need Python >= 3.11 (tpu-ubuntu2204-base ships 3.10): say so
    # on the worker instead of letting pip fail on an unsatisfiable requirement.
    py_check="python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo 'pixelvla_jax needs Python >= 3.11 on the TPU VM: install it (e.g. python3.11 + venv) or use a newer runtime' >&2; exit 1; }"
    on_all_workers "$py_check && cd ~/$REMOTE_DIR && pip install -U pip && pip install -e . 'jax[tpu]==$jax_version' -c constraints.txt"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR=gs://... (checkpoints and logs are written there)}"
    : "${DATA_DIR:?set DATA_DIR=gs://... (the RLDS datasets, read as TFDS_DATA_DIR)}"
    [[ $# -gt 0 ]] || { echo "train needs --config=configs/<name>.py" >&2; exit 2; }
    args=$(printf ' %q' "$@")
    on_all_workers "cd ~/$REMOTE_DIR && export TFDS_DATA_DIR=$DATA_DIR && nohup python -m pixelvla_jax.train$args --workdir=$WORKDIR --data_dir=$DATA_DIR > $LOG 2>&1 &"
    echo "Started on all workers. Follow with: launch/tpu.sh logs"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
      --worker=0 --command "tail -n 100 -f $LOG"
    ;;
  stop)
    on_all_workers "pkill -TERM -f pixelvla_jax.train || true"
    ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$QR_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
    fi
    ;;
  *)
    echo "unknown command '$CMD': use create, install, train, logs, stop or delete" >&2
    exit 2
    ;;
esac
