#!/usr/bin/env bash
# Starts (or resumes) training on every worker of the TPU VM slice $TPU_NAME, detached.
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/train.sh CONFIG WORKDIR [MAIN_FLAGS...]
       launch/train.sh --status | --tail [WORKER] | --stop

Starts on every worker of \$TPU_NAME at once, detached (nohup, own session), so it
survives the SSH session:
  python -m convnext_jax.main --config CONFIG --workdir WORKDIR --jax_distributed [MAIN_FLAGS...]
with TFDS_DATA_DIR=\$DATA_DIR. Each worker logs to
~/\$REMOTE_LOG_DIR/train_<time>.log, linked as ~/\$REMOTE_LOG_DIR/train_latest.log.

  CONFIG      a config file of the checkout on the workers, with its argument if any:
              configs/convnext_b_in22k.py
              'configs/convnext_b_in22k_ft_in1k.py:init=gs://BUCKET/convnext_base_in22k,res=384'
  WORKDIR     gs://... , or a name that becomes gs://\$BUCKET/NAME. Checkpoints and
              TensorBoard logs go there; it must be on GCS (every worker writes to it).
  MAIN_FLAGS  more flags for convnext_jax.main, e.g. --config.grad_accum_steps=2
              --config.mesh='(1,-1,1)' --config.model.remat=True

Resuming: run the same command again. A WORKDIR that has a checkpoint resumes from its latest
one (optimizer state, step and data position included); keep CONFIG and MAIN_FLAGS the same.
On SIGTERM (a spot/preemptible TPU being reclaimed, or --stop) the trainer writes a
checkpoint at the next step boundary and exits with status 0. After a preemption, delete
and re-create the TPU, run setup_tpu.sh, and run the same train.sh command: it continues
(at worst from the last periodic checkpoint, every config.checkpoint_every_steps steps).

Other commands:
  --status        on every worker: running or not, and the log's last lines
  --tail [W]      follow worker W's log (default 0; Ctrl-C stops following, not training)
  --stop          SIGTERM the training on every worker (it checkpoints and exits); whatever
                  still runs after \$STOP_TIMEOUT s is killed
  -h, --help      this help

Settings (environment variables, with their defaults):
  TPU_NAME=$TPU_NAME ZONE=$ZONE PROJECT=${PROJECT:-<gcloud default>}
  BUCKET=${BUCKET:-}
  DATA_DIR=gs://\$BUCKET/tensorflow_datasets   exported as TFDS_DATA_DIR on the workers
  JAX_DISTRIBUTED=1       0: leave out --jax_distributed (single-host slices only)
  TRAIN_ENV=              more NAME=VALUE settings for the trainer, space-separated,
                          e.g. 'TF_CPP_MIN_LOG_LEVEL=2' (quieter TensorFlow logs)
  STOP_TIMEOUT=300        seconds --stop waits before killing
  REMOTE_DIR=$REMOTE_DIR REMOTE_VENV=$REMOTE_VENV REMOTE_LOG_DIR=$REMOTE_LOG_DIR
  DRY_RUN=0               1: print the commands and the remote script instead

Watch it:
  launch/train.sh --tail                 # worker 0's log
  launch/train.sh --status
  tensorboard --logdir gs://\$BUCKET/NAME  # from any machine with access to the bucket
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DATA_DIR=${DATA_DIR:-${BUCKET:+gs://$BUCKET/tensorflow_datasets}}
JAX_DISTRIBUTED=${JAX_DISTRIBUTED:-1}
TRAIN_ENV=${TRAIN_ENV:-}
STOP_TIMEOUT=${STOP_TIMEOUT:-300}

case ${1:-} in
  -h | --help)
    usage
    exit 0
    ;;
  --status)
    (($# == 1)) || die "--status takes no arguments"
    script=$(
      remote_prelude
      cat <<'EOF'
log="$REMOTE_LOG_DIR/train_latest.log"
if pgid=$(training_pgid); then
  say "RUNNING (process group $pgid), log ~/$log"
else
  say "not running; last log ~/$log"
fi
if [[ -f $log ]]; then tail -n 3 "$log" | sed "s/^/[$(hostname)]   /"; fi
EOF
    )
    tpu_ssh all "$script"
    exit 0
    ;;
  --tail)
    (($# <= 2)) || die "--tail takes at most one argument, a worker index"
    worker=${2:-0}
    script=$(
      remote_prelude
      cat <<'EOF'
log="$REMOTE_LOG_DIR/train_latest.log"
[[ -e $log ]] || { say "no ~/$log yet: start a run with launch/train.sh CONFIG WORKDIR"; exit 1; }
exec tail -n 100 -F "$log"
EOF
    )
    tpu_ssh "$worker" "$script"
    exit 0
    ;;
  --stop)
    (($# == 1)) || die "--stop takes no arguments"
    script=$(
      remote_prelude
      remote_vars STOP_TIMEOUT
      cat <<'EOF'
if ! pgid=$(training_pgid); then
  say "no training running"
  exit 0
fi
say "SIGTERM to process group $pgid: checkpoint at the next step, then exit"
kill -TERM -- "-$pgid"
for ((waited = 0; waited < STOP_TIMEOUT; waited += 5)); do
  kill -0 -- "-$pgid" 2>/dev/null || { say "stopped"; exit 0; }
  sleep 5
done
say "still running after $STOP_TIMEOUT s: SIGKILL (resume starts from the last checkpoint)"
kill -KILL -- "-$pgid" 2>/dev/null || true
EOF
    )
    tpu_ssh all "$script"
    exit 0
    ;;
  -*)
    usage >&2
    die "unknown option: $1"
    ;;
esac

(($# >= 2)) || { usage >&2; die "expected CONFIG and WORKDIR"; }
CONFIG=$1
WORKDIR=$2
shift 2
MAIN_FLAGS=("$@")

if [[ $WORKDIR != gs://* ]]; then
  [[ $WORKDIR != /* && $WORKDIR != .* && $WORKDIR != *:* ]] ||
    die "WORKDIR $WORKDIR is not on GCS: give gs://... or a name under gs://\$BUCKET (every worker must see the same checkpoints)"
  need_bucket
  WORKDIR=gs://$BUCKET/$WORKDIR
fi
[[ -n $DATA_DIR ]] || die "set BUCKET (datasets in gs://\$BUCKET/tensorflow_datasets) or DATA_DIR"
if [[ -d $REPO_ROOT/configs && ! -f $REPO_ROOT/${CONFIG%%:*} ]]; then
  say "warning: ${CONFIG%%:*} is not in this checkout; the workers' copy must have it"
fi

# The trainer's command line, shell-quoted for the remote script.
main=(-m convnext_jax.main --config "$CONFIG" --workdir "$WORKDIR")
[[ $JAX_DISTRIBUTED == 1 ]] && main+=(--jax_distributed)
main+=(${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})
MAIN_ARGS=$(printf '%q ' "${main[@]}")
ENV_ARGS=$(printf '%q ' "TFDS_DATA_DIR=$DATA_DIR")
if [[ -n $TRAIN_ENV ]]; then
  read -r -a train_env <<<"$TRAIN_ENV"
  ENV_ARGS+=$(printf '%q ' "${train_env[@]}")
fi
# Both go to the remote script through remote_vars.
# shellcheck disable=SC2034
STAMP=$(date -u +%Y%m%d_%H%M%S)  # The same on every worker.
# shellcheck disable=SC2034
CONFIG_FILE=${CONFIG%%:*}

script=$(
  remote_prelude
  remote_vars STAMP CONFIG_FILE
  printf 'MAIN_ARGS=(%s)\nENV_ARGS=(%s)\n' "$MAIN_ARGS" "$ENV_ARGS"
  cat <<'EOF'
if pgid=$(training_pgid); then
  say "a training run is already going (process group $pgid); see launch/train.sh --status, or --stop it"
  exit 1
fi
[[ -f $REMOTE_DIR/$CONFIG_FILE ]] ||
  { say "no ~/$REMOTE_DIR/$CONFIG_FILE: run launch/setup_tpu.sh to copy the current code"; exit 1; }
[[ -x $REMOTE_VENV/bin/python ]] ||
  { say "no virtual environment ~/$REMOTE_VENV: run launch/setup_tpu.sh first"; exit 1; }
mkdir -p "$REMOTE_LOG_DIR"
log_dir=$(cd "$REMOTE_LOG_DIR" && pwd)
python=$(cd "$REMOTE_VENV" && pwd)/bin/python
log="$log_dir/train_$STAMP.log"
ln -sfn "train_$STAMP.log" "$log_dir/train_latest.log"
cd "$REMOTE_DIR"
{
  echo "[launch/train.sh] $(date -u) on $(hostname) in $PWD"
  echo "[launch/train.sh] env ${ENV_ARGS[*]}"
  echo "[launch/train.sh] $python ${MAIN_ARGS[*]}"
} >"$log"
# setsid: its own session and process group (what --stop signals), untouched when the SSH
# session ends; nohup: SIGHUP ignored as well. The wrapping bash outlives a SIGTERM (its
# trap waits for the trainer, which handles the signal itself) to log the exit status.
# shellcheck disable=SC2016  # Expanded by the inner bash.
nohup setsid env "${ENV_ARGS[@]}" bash -c \
  'trap : TERM; "$@"; status=$?; echo "[launch/train.sh] $(date -u): exited with status $status"' \
  train "$python" "${MAIN_ARGS[@]}" >>"$log" 2>&1 </dev/null &
echo $! >"$log_dir/train.pid"
say "started (process group $!), log ~/$REMOTE_LOG_DIR/train_$STAMP.log"
EOF
)
say "starting $CONFIG on every worker of $TPU_NAME, workdir $WORKDIR"
tpu_ssh all "$script"
say "follow it: launch/train.sh --tail   (status: --status, stop: --stop)"
say "TensorBoard: tensorboard --logdir $WORKDIR"
