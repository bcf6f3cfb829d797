#!/usr/bin/env bash
# Deletes the Cloud TPU VM slice $TPU_NAME (and its queued resource, if it has one).
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/delete_tpu.sh [--queued] [--async]

Deletes the TPU VM slice \$TPU_NAME with all its workers' disks (the virtual environment,
logs and anything else on them). Checkpoints, TensorBoard logs and datasets in
gs://\$BUCKET stay. If a queued resource \$QUEUED_RESOURCE_ID exists, it is deleted with
its node (--force); --queued says so without looking it up.

Options:
  --queued    Delete the queued resource \$QUEUED_RESOURCE_ID and its node.
  --async     Return without waiting for the deletion to finish.
  -h, --help  This help.

Settings: TPU_NAME=$TPU_NAME ZONE=$ZONE PROJECT=${PROJECT:-<gcloud default>}
          QUEUED_RESOURCE_ID=\${TPU_NAME}-qr DRY_RUN=0
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-${TPU_NAME}-qr}

queued=0
flags=(--quiet)
while (($#)); do
  case $1 in
    --queued) queued=1 ;;
    --async) flags+=(--async) ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
need_gcloud

if ((!queued)) && [[ $DRY_RUN != 1 ]] &&
  gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE_ID" "${GCLOUD_LOCATION[@]}" \
    --format='value(name)' >/dev/null 2>&1; then
  queued=1
fi

if ((queued)); then
  say "deleting queued resource $QUEUED_RESOURCE_ID and its TPU $TPU_NAME"
  run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE_ID" "${GCLOUD_LOCATION[@]}" \
    --force "${flags[@]}"
else
  say "deleting TPU VM $TPU_NAME"
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOCATION[@]}" "${flags[@]}"
fi
