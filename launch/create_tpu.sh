#!/usr/bin/env bash
# Creates the Cloud TPU VM slice $TPU_NAME, directly or through a queued resource.
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/create_tpu.sh [--spot | --preemptible] [--reserved] [--queued [--wait]]

Creates a Cloud TPU VM slice (all its workers) for convnext_jax.

Options:
  --spot          Spot VMs: much cheaper, can be preempted at any time (no 24 h limit).
  --preemptible   Preemptible TPUs (older model: preempted at the latest after 24 h).
                  Not with --queued.
  --reserved      Use your project's TPU reservation.
  --queued        Request the slice through a queued resource
                  ('gcloud compute tpus queued-resources create'): the request waits in a
                  queue until capacity is free instead of failing at once. Recommended for
                  large slices.
  --wait          With --queued: poll every 60 s until the request is ACTIVE (or fails).
  -h, --help      This help.

Settings (environment variables, with their defaults):
  TPU_NAME=$TPU_NAME            the TPU VM (node) name
  ZONE=$ZONE                 a zone that has ACCELERATOR_TYPE
  PROJECT=${PROJECT:-<gcloud default>}
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE        e.g. v4-32, v5litepod-64, v5p-128, v6e-64
  RUNTIME_VERSION=$RUNTIME_VERSION
      default from ACCELERATOR_TYPE: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
      v5e (v5litepod) -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base
  QUEUED_RESOURCE_ID=\${TPU_NAME}-qr       with --queued
  VALID_UNTIL_DURATION=                  with --queued: give up after this long, e.g. 6h
  SERVICE_ACCOUNT=                       service account of the VMs (default: the Compute
                                         Engine default); it needs read/write on BUCKET
  SCOPES=                                e.g. https://www.googleapis.com/auth/cloud-platform
  NETWORK= SUBNETWORK=                   VPC network (default: 'default')
  CREATE_FLAGS=                          any further gcloud flags, space-separated
  DRY_RUN=0                              1: print the gcloud commands instead

Examples:
  ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b launch/create_tpu.sh
  ACCELERATOR_TYPE=v5litepod-64 ZONE=us-west4-a launch/create_tpu.sh --spot --queued --wait

Next: launch/setup_tpu.sh. Delete it with launch/delete_tpu.sh.
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-${TPU_NAME}-qr}
VALID_UNTIL_DURATION=${VALID_UNTIL_DURATION:-}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}
SCOPES=${SCOPES:-}
NETWORK=${NETWORK:-}
SUBNETWORK=${SUBNETWORK:-}
CREATE_FLAGS=${CREATE_FLAGS:-}

spot=0 preemptible=0 reserved=0 queued=0 wait=0
while (($#)); do
  case $1 in
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --reserved) reserved=1 ;;
    --queued) queued=1 ;;
    --wait) wait=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
((spot && preemptible)) && die "--spot and --preemptible exclude each other; pick one"
((queued && preemptible)) && die "queued resources take --spot, not --preemptible"
((wait && !queued)) && die "--wait only applies to --queued (a direct create already waits)"
need_gcloud

common=(--accelerator-type="$ACCELERATOR_TYPE")
((spot)) && common+=(--spot)
((reserved)) && common+=(--reserved)
[[ -n $SERVICE_ACCOUNT ]] && common+=(--service-account="$SERVICE_ACCOUNT")
[[ -n $SCOPES ]] && common+=(--scopes="$SCOPES")
[[ -n $NETWORK ]] && common+=(--network="$NETWORK")
[[ -n $SUBNETWORK ]] && common+=(--subnetwork="$SUBNETWORK")
extra=()
if [[ -n $CREATE_FLAGS ]]; then
  read -r -a extra <<<"$CREATE_FLAGS"
fi

if ((queued)); then
  say "queued resource $QUEUED_RESOURCE_ID: node $TPU_NAME, $ACCELERATOR_TYPE, $RUNTIME_VERSION, zone $ZONE"
  qr=(--node-id="$TPU_NAME" --runtime-version="$RUNTIME_VERSION")
  [[ -n $VALID_UNTIL_DURATION ]] && qr+=(--valid-until-duration="$VALID_UNTIL_DURATION")
  run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE_ID" "${GCLOUD_LOCATION[@]}" \
    "${common[@]}" "${qr[@]}" ${extra[@]+"${extra[@]}"}
  if ((wait)) && [[ $DRY_RUN != 1 ]]; then
    while true; do
      state=$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE_ID" \
        "${GCLOUD_LOCATION[@]}" --format='value(state.state)')
      case $state in
        ACTIVE) say "$QUEUED_RESOURCE_ID is ACTIVE: TPU $TPU_NAME is ready"; break ;;
        FAILED | SUSPENDED | SUSPENDING | DELETING)
          die "$QUEUED_RESOURCE_ID is $state; see 'gcloud compute tpus queued-resources describe $QUEUED_RESOURCE_ID --zone=$ZONE', then launch/delete_tpu.sh --queued and try again" ;;
        *) say "$(date +%H:%M:%S) $QUEUED_RESOURCE_ID: $state"; sleep 60 ;;
      esac
    done
  elif ((!wait)); then
    say "queued; follow it with: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE_ID --zone=$ZONE --format='value(state.state)'"
    say "when it is ACTIVE, run launch/setup_tpu.sh"
    exit 0
  fi
else
  say "TPU VM $TPU_NAME: $ACCELERATOR_TYPE, $RUNTIME_VERSION, zone $ZONE"
  ((preemptible)) && common+=(--preemptible)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_LOCATION[@]}" \
    --version="$RUNTIME_VERSION" "${common[@]}" ${extra[@]+"${extra[@]}"}
fi
say "next: launch/setup_tpu.sh"
