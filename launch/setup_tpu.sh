#!/usr/bin/env bash
# Installs convnext_jax on every worker of the TPU VM slice $TPU_NAME and checks the TPUs.
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/setup_tpu.sh

On every worker of \$TPU_NAME at once: puts the code in ~/\$REMOTE_DIR (a copy of this
checkout, or a clone of \$REPO_URL), makes sure a Python >= 3.11 exists (installing the
Ubuntu python3.11 packages if not: the TPU images ship 3.10), creates the virtual
environment ~/\$REMOTE_VENV, runs pip install -e '.[\$EXTRAS]', then checks that JAX sees
the TPUs (python -c 'import jax; print(jax.device_count())') and, when BUCKET is set, that
every worker can write to gs://\$BUCKET.

Run it again after changing the code: it replaces ~/\$REMOTE_DIR and re-installs. It refuses
while a training started by launch/train.sh is running (stop it with launch/train.sh --stop).

Settings (environment variables, with their defaults):
  TPU_NAME=$TPU_NAME ZONE=$ZONE PROJECT=${PROJECT:-<gcloud default>}
  REPO_URL=                   empty: copy this checkout (tracked files and untracked,
                              non-ignored ones); else git clone this URL on the workers
  REPO_BRANCH=main            branch or tag to clone
  REMOTE_DIR=$REMOTE_DIR      code directory on the workers (relative to home)
  REMOTE_VENV=$REMOTE_VENV    virtual environment on the workers
  REMOTE_LOG_DIR=$REMOTE_LOG_DIR
  PYTHON=                     interpreter for the venv (default: the newest of python3.12,
                              python3.11, python3 that is >= 3.11)
  EXTRAS=tpu                  extras of setup.cfg to install (tpu, torch, cuda, test)
  PIP_PACKAGES=               more packages, e.g. 'apache-beam' for prepare_imagenet.sh --beam
  BUCKET=${BUCKET:-}                     checked for write access when set
  GCLOUD_SSH_FLAGS=           extra gcloud ssh/scp flags, e.g. --internal-ip
  DRY_RUN=0                   1: print the commands and the remote script instead

Next: launch/prepare_imagenet.sh (once per bucket), then launch/train.sh.
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL=${REPO_URL:-}
REPO_BRANCH=${REPO_BRANCH:-main}
PYTHON=${PYTHON:-}
EXTRAS=${EXTRAS:-tpu}
PIP_PACKAGES=${PIP_PACKAGES:-}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
  '') ;;
  *) usage >&2; die "unknown argument: $1" ;;
esac
need_gcloud

SRC_TARBALL=convnext_jax_src.tar.gz  # In the remote home, removed after unpacking.

# ---- The code: a tarball of this checkout, copied to every worker. ----
if [[ -z $REPO_URL ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files that exist: what `git status` would show.
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      (cd "$REPO_ROOT" && while IFS= read -r -d '' f; do
        if [[ -f $f ]]; then printf '%s\0' "$f"; fi
      done) |
      tar -czf "$tmp/$SRC_TARBALL" -C "$REPO_ROOT" --null -T -
  else
    tar -czf "$tmp/$SRC_TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude=.venv \
      --exclude='*.egg-info' --exclude=__pycache__ .
  fi
  say "copying $REPO_ROOT ($(du -h "$tmp/$SRC_TARBALL" | cut -f1) packed) to every worker of $TPU_NAME"
  tpu_scp "$tmp/$SRC_TARBALL" "$SRC_TARBALL"
else
  say "workers will clone $REPO_URL ($REPO_BRANCH)"
fi

# ---- The remote script, run on all workers at once. ----
script=$(
  remote_prelude
  remote_vars REPO_URL REPO_BRANCH PYTHON EXTRAS PIP_PACKAGES BUCKET SRC_TARBALL
  cat <<'EOF'
if pgid=$(training_pgid); then
  say "a training run is going (process group $pgid): stop it first with launch/train.sh --stop"
  exit 1
fi

# Code.
if [[ -z $REPO_URL ]]; then
  rm -rf "$REMOTE_DIR.new"
  mkdir -p "$REMOTE_DIR.new"
  tar -xzf "$SRC_TARBALL" -C "$REMOTE_DIR.new"
  rm -rf "$REMOTE_DIR"
  mv "$REMOTE_DIR.new" "$REMOTE_DIR"
  rm -f "$SRC_TARBALL"
else
  rm -rf "$REMOTE_DIR"
  git clone --quiet --depth 1 --branch "$REPO_BRANCH" "$REPO_URL" "$REMOTE_DIR"
fi

# A Python >= 3.11 (jax 0.10+ needs it; the TPU VM images ship Ubuntu 22.04's 3.10).
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [[ -z $PYTHON ]]; then
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && new_enough "$candidate"; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [[ -z $PYTHON ]]; then
  say "no Python >= 3.11: installing python3.11 and python3.11-venv with apt"
  sudo apt-get -qq update
  sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11 python3.11-venv >/dev/null
  PYTHON=python3.11
fi
new_enough "$PYTHON" || { say "$PYTHON is older than 3.11; set PYTHON to a newer interpreter"; exit 1; }

# Virtual environment and the project.
if [[ -x $REMOTE_VENV/bin/python ]] && ! new_enough "$REMOTE_VENV/bin/python"; then
  rm -rf "$REMOTE_VENV"
fi
if [[ ! -x $REMOTE_VENV/bin/python ]]; then
  "$PYTHON" -m venv "$REMOTE_VENV"
fi
pip=("$REMOTE_VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
say "pip install -e '.[$EXTRAS]' $PIP_PACKAGES"
# shellcheck disable=SC2086  # PIP_PACKAGES is a space-separated list.
(cd "$REMOTE_DIR" && "${pip[@]}" install --quiet -e ".[$EXTRAS]" $PIP_PACKAGES)
mkdir -p "$REMOTE_LOG_DIR"

# Checks.
devices=$("$REMOTE_VENV/bin/python" -c 'import jax; print(jax.device_count())')
say "jax sees $devices TPU devices in the slice"
if [[ -n $BUCKET ]]; then
  "$REMOTE_VENV/bin/python" - "gs://$BUCKET/.convnext_write_check_$(hostname)" <<'PY'
import sys
from etils import epath
path = epath.Path(sys.argv[1])
try:
  path.write_text('ok')
  path.unlink()
except Exception as e:  # Any failure means the same fix.
  sys.exit(f'cannot write {path}: {e}; give the TPU VMs\' service account read/write '
           '(roles/storage.objectAdmin) on the bucket')
PY
  say "gs://$BUCKET is writable"
fi
say "ready: $("$REMOTE_VENV/bin/python" --version), venv ~/$REMOTE_VENV, code ~/$REMOTE_DIR"
EOF
)
say "installing on every worker of $TPU_NAME (a few minutes)"
tpu_ssh all "$script"
say "next: launch/prepare_imagenet.sh (once per bucket), then launch/train.sh"
