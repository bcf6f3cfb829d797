#!/usr/bin/env bash
# Prepares the ImageNet tfds datasets convnext_jax trains on into gs://$BUCKET/tensorflow_datasets.
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/prepare_imagenet.sh [--on-tpu] [--beam] [DATASET...]

Prepares tfds datasets into \$DATA_DIR with convnext_jax's own API, on one machine:
  python -c "from convnext_jax import datasets; datasets.prepare(NAME, data_dir=..., manual_dir=...)"
A dataset already prepared there is left as it is. Run it where the project is installed:
this machine (a VM in the bucket's region is best) or, with --on-tpu, worker 0 of \$TPU_NAME
after launch/setup_tpu.sh.

DATASET (default: imagenet2012), one or more of:
  imagenet2012       ImageNet-1k. Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
                     (from image-net.org) in \$MANUAL_DIR first. Several hours.
  imagenet22k        The full ImageNet (21841 classes) from \$MANUAL_DIR_22K: the class tars
                     n01440764.tar ... or fall11_whole.tar itself. About 1.3 TB: use --beam.
  imagenet2012_real  ImageNet ReaL labels (needs ILSVRC2012_img_val.tar in \$MANUAL_DIR).
  imagenet_v2        ImageNet-V2 (downloaded automatically).
  convnext_shapes    A tiny synthetic set, built in seconds: checks that DATA_DIR works.

Options:
  --on-tpu    Run on worker 0 of \$TPU_NAME, detached (nohup), logging to
              ~/\$REMOTE_LOG_DIR/prepare_<time>.log there; prints how to follow it.
  --beam      Build imagenet22k with Apache Beam: one work item per class tar, in parallel
              (needs the apache-beam package: pip install apache-beam, or
              PIP_PACKAGES=apache-beam launch/setup_tpu.sh). Default pipeline: the
              DirectRunner with one process per core; BEAM_OPTIONS replaces it.
  -h, --help  This help.

Settings (environment variables, with their defaults):
  BUCKET=${BUCKET:-}
  DATA_DIR=gs://\$BUCKET/tensorflow_datasets           where prepared datasets go
  MANUAL_DIR=gs://\$BUCKET/manual/imagenet2012         ILSVRC2012_img_{train,val}.tar
  MANUAL_DIR_22K=gs://\$BUCKET/manual/imagenet22k      class tars or fall11_whole.tar
  CLASS_LIST=                 imagenet22k labels from this wnid list (one per line), e.g.
                              timm's imagenet22k_synsets.txt for winter21 in the 21841-class
                              label space; the dataset is then named imagenet22k/classesN_HASH
                              (printed at the end): train with --config.dataset.name=<it>
  BEAM_OPTIONS=               with --beam: comma-separated Beam pipeline options, e.g.
                              runner=DirectRunner,direct_num_workers=16,direct_running_mode=multi_processing
  PYTHON=                     interpreter with convnext_jax installed (default: the
                              checkout's .venv, else python3; with --on-tpu: ~/\$REMOTE_VENV)
  TPU_NAME=$TPU_NAME ZONE=$ZONE   with --on-tpu
  DRY_RUN=0                   1: print what would run instead

Examples:
  gcloud storage cp ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar gs://\$BUCKET/manual/imagenet2012/
  launch/prepare_imagenet.sh --on-tpu imagenet2012
  launch/prepare_imagenet.sh --beam imagenet22k
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DATA_DIR=${DATA_DIR:-${BUCKET:+gs://$BUCKET/tensorflow_datasets}}
MANUAL_DIR=${MANUAL_DIR:-${BUCKET:+gs://$BUCKET/manual/imagenet2012}}
MANUAL_DIR_22K=${MANUAL_DIR_22K:-${BUCKET:+gs://$BUCKET/manual/imagenet22k}}
CLASS_LIST=${CLASS_LIST:-}
BEAM_OPTIONS=${BEAM_OPTIONS:-}
PYTHON=${PYTHON:-}

on_tpu=0 beam=0
names=()
while (($#)); do
  case $1 in
    --on-tpu) on_tpu=1 ;;
    --beam) beam=1 ;;
    -h | --help) usage; exit 0 ;;
    imagenet2012 | imagenet22k | imagenet2012_real | imagenet_v2 | convnext_shapes) names+=("$1") ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
((${#names[@]})) || names=(imagenet2012)
[[ -n $DATA_DIR ]] || die "set BUCKET (datasets go to gs://\$BUCKET/tensorflow_datasets) or DATA_DIR"
if ((beam)); then
  for name in "${names[@]}"; do
    [[ $name == imagenet22k ]] || die "--beam applies to imagenet22k only; prepare $name in a separate run without it"
  done
fi

# ---- --on-tpu: run this same script on worker 0, detached. ----
if ((on_tpu)); then
  args=()
  ((beam)) && args+=(--beam)
  args+=("${names[@]}")
  ARGS=$(printf '%q ' "${args[@]}")
  STAMP=$(date -u +%Y%m%d_%H%M%S)
  script=$(
    remote_prelude
    remote_vars DATA_DIR MANUAL_DIR MANUAL_DIR_22K CLASS_LIST BEAM_OPTIONS STAMP
    printf 'ARGS=(%s)\n' "$ARGS"
    cat <<'EOF'
[[ -x $REMOTE_VENV/bin/python && -f $REMOTE_DIR/launch/prepare_imagenet.sh ]] ||
  { say "no ~/$REMOTE_VENV or ~/$REMOTE_DIR/launch: run launch/setup_tpu.sh first"; exit 1; }
mkdir -p "$REMOTE_LOG_DIR"
log="$(cd "$REMOTE_LOG_DIR" && pwd)/prepare_$STAMP.log"
python=$(cd "$REMOTE_VENV" && pwd)/bin/python
cd "$REMOTE_DIR"
export DATA_DIR MANUAL_DIR MANUAL_DIR_22K CLASS_LIST BEAM_OPTIONS
nohup setsid env PYTHON="$python" bash launch/prepare_imagenet.sh "${ARGS[@]}" >"$log" 2>&1 </dev/null &
say "preparing ${ARGS[*]} (pid $!), log ~/$REMOTE_LOG_DIR/prepare_$STAMP.log"
EOF
  )
  tpu_ssh 0 "$script"
  say "follow it: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -n 50 -F $REMOTE_LOG_DIR/prepare_$STAMP.log'"
  exit 0
fi

# ---- Here: prepare each dataset in turn. ----
if [[ -z $PYTHON ]]; then
  if [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    PYTHON=$REPO_ROOT/.venv/bin/python
  else
    PYTHON=python3
  fi
fi
if [[ $DRY_RUN != 1 ]]; then
  "$PYTHON" -c 'import convnext_jax.datasets' 2>/dev/null ||
    die "$PYTHON cannot import convnext_jax.datasets: pip install -e . in $REPO_ROOT, or set PYTHON"
  if ((beam)) && ! "$PYTHON" -c 'import apache_beam' 2>/dev/null; then
    die "--beam needs Apache Beam: $PYTHON -m pip install apache-beam"
  fi
fi
if ((beam)) && [[ -z $BEAM_OPTIONS ]]; then
  cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 4)
  BEAM_OPTIONS=runner=DirectRunner,direct_num_workers=$cores,direct_running_mode=multi_processing
fi

# Arguments: name, data_dir, manual_dir ('' = none), class_list ('' = none), beam_options.
read -r -d '' PREPARE_PY <<'EOF' || true
import sys
from absl import logging
import tensorflow_datasets as tfds
from convnext_jax import datasets

name, data_dir, manual_dir, class_list, beam_options = sys.argv[1:]
logging.set_verbosity(logging.INFO)
kwargs = {'class_list': class_list} if class_list else {}
if beam_options:
  from apache_beam.options import pipeline_options
  options = pipeline_options.PipelineOptions(['--' + o for o in beam_options.split(',')])
  builder = datasets.builder(name, data_dir=data_dir, **kwargs)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None, beam_options=options))
else:
  builder = datasets.prepare(name, data_dir=data_dir, manual_dir=manual_dir or None, **kwargs)
splits = ', '.join(f'{s}: {v.num_examples}' for s, v in sorted(builder.info.splits.items()))
print(f'{builder.info.full_name} is ready in {builder.data_dir} ({splits})')
config = builder.builder_config.name if builder.builder_config else ''
if config and config != 'default':
  print(f'train on it with --config.dataset.name={name}/{config}')
EOF

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}  # Nothing here needs the TPU a training may hold.
for name in "${names[@]}"; do
  manual='' class_list='' beam_options=''
  case $name in
    imagenet2012 | imagenet2012_real) manual=$MANUAL_DIR ;;
    imagenet22k)
      manual=$MANUAL_DIR_22K
      class_list=$CLASS_LIST
      ((beam)) && beam_options=$BEAM_OPTIONS
      ;;
  esac
  say "$name -> $DATA_DIR${manual:+ (manual files: $manual)}${class_list:+ (classes: $class_list)}${beam_options:+ (beam: $beam_options)}"
  run "$PYTHON" -c "$PREPARE_PY" "$name" "$DATA_DIR" "$manual" "$class_list" "$beam_options"
done
