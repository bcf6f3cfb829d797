# shellcheck shell=bash
# Settings and helpers shared by the launch/ scripts. Sourced by them, never run.
#
# Every setting comes from the environment; the defaults are below. Works with bash 3.2
# (macOS) and later, so empty arrays are expanded as ${a[@]+"${a[@]}"}.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # Used by the scripts that source this file.
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

TPU_NAME=${TPU_NAME:-convnext-tpu}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
BUCKET=${BUCKET:-}
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
# Paths on the TPU workers, relative to the remote home directory (or absolute).
REMOTE_DIR=${REMOTE_DIR:-convnext_jax}
REMOTE_VENV=${REMOTE_VENV:-convnext_venv}
REMOTE_LOG_DIR=${REMOTE_LOG_DIR:-convnext_logs}
# Extra flags for `gcloud compute tpus tpu-vm ssh/scp`, e.g. '--internal-ip'.
GCLOUD_SSH_FLAGS=${GCLOUD_SSH_FLAGS:-}
# DRY_RUN=1 prints the gcloud commands (and remote scripts) instead of running them.
DRY_RUN=${DRY_RUN:-0}

# The TPU software version ("runtime version") Google documents for JAX on each generation.
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;  # v4 and older
  esac
}
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}

GCLOUD_LOCATION=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then
  GCLOUD_LOCATION+=(--project="$PROJECT")
fi
SSH_EXTRA=()
if [[ -n $GCLOUD_SSH_FLAGS ]]; then
  read -r -a SSH_EXTRA <<<"$GCLOUD_SSH_FLAGS"
fi

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

say() {
  echo "[$(basename "$0")] $*" >&2
}

# Runs a command, or prints it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

need_gcloud() {
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'"
  fi
}

need_bucket() {
  if [[ -z $BUCKET ]]; then
    die "BUCKET is not set: export BUCKET=<your GCS bucket name> (in the TPU's region)"
  fi
}

# Shell assignments NAME=<quoted value> for the named variables, one per line, to put at the
# top of a remote script.
remote_vars() {
  local name
  for name in "$@"; do
    printf '%s=%q\n' "$name" "${!name}"
  done
}

# Lines every remote script starts with: strict mode, the home directory, helpers.
remote_prelude() {
  cat <<'EOF'
set -euo pipefail
cd "$HOME"
say() { echo "[$(hostname)] $*"; }
# The process group of the training started by launch/train.sh, if it is still running.
training_pgid() {
  local pid_file="$REMOTE_LOG_DIR/train.pid" pgid
  [[ -f $pid_file ]] || return 1
  pgid=$(cat "$pid_file")
  kill -0 -- "-$pgid" 2>/dev/null || return 1
  echo "$pgid"
}
EOF
  remote_vars REMOTE_DIR REMOTE_VENV REMOTE_LOG_DIR
}

# tpu_ssh WORKER SCRIPT: runs the bash SCRIPT on WORKER ('all' or an index) of $TPU_NAME.
# The script travels base64-encoded, so no quoting survives two shells by luck.
tpu_ssh() {
  local worker=$1 script=$2 encoded
  need_gcloud
  if [[ $DRY_RUN == 1 ]]; then
    # shellcheck disable=SC2016  # Printed as the real command would look, unexpanded.
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker="$worker" \
      ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} --command='bash -c "$(echo <SCRIPT> | base64 -d)"'
    printf '%s\n' '--- SCRIPT ---' "$script" '--- END SCRIPT ---'
    return
  fi
  encoded=$(printf '%s\n' "$script" | base64 | tr -d '\n')
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker="$worker" \
    ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} --command="bash -c \"\$(echo $encoded | base64 -d)\""
}

# tpu_scp LOCAL_FILE REMOTE_PATH: copies a file to every worker of $TPU_NAME.
tpu_scp() {
  need_gcloud
  run gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${GCLOUD_LOCATION[@]}" --worker=all \
    ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"}
}
