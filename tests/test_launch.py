"""The Cloud TPU VM scripts of `launch/`, on a v4-32 and a v5litepod-16, with a fake `gcloud`
first on PATH that records every call (and decodes the script an `ssh --command` carries).

For create, setup, train, stop and delete: with DRY_RUN=1 a script calls no gcloud at all and
prints exactly the commands (and remote scripts) that it then runs without DRY_RUN; those
commands are the expected ones (every worker, the runtime version of the TPU generation, the
trainer's flags). The remote training script, run in a scratch home directory with a fake
venv Python, starts the trainer with those flags, detached; the remote --stop script sends it
SIGTERM.
"""

import contextlib
import json
import os
import pathlib
import re
import shlex
import signal
import stat
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
CONFIG = 'configs/convnext_b_in22k.py'
# The TPU generation -> (a zone that has it, the runtime version Google documents for JAX).
SLICES = {
    'v4-32': ('us-central2-b', 'tpu-ubuntu2204-base'),
    'v5litepod-16': ('us-west4-a', 'v2-alpha-tpuv5-lite'),
}
STEPS = {
    'create': ['create_tpu.sh'],
    'setup': ['setup_tpu.sh'],
    'train': ['train.sh', CONFIG, 'b22k', '--config.grad_accum_steps=2'],
    'stop': ['train.sh', '--stop'],
    'delete': ['delete_tpu.sh'],
}

FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""A stand-in for gcloud: appends its arguments (and what they carry) to $FAKE_GCLOUD_LOG."""
import base64, json, os, re, sys, tarfile
record = {'argv': sys.argv[1:]}
for arg in sys.argv[1:]:
  m = re.fullmatch(r'--command=bash -c "\$\(echo (\S+) \| base64 -d\)"', arg)
  if m:
    record['script'] = base64.b64decode(m.group(1)).decode()
if sys.argv[1:5] == ['compute', 'tpus', 'tpu-vm', 'scp']:
  with tarfile.open(sys.argv[5]) as tar:
    record['files'] = tar.getnames()
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(record) + '\n')
# No queued resource exists; everything else succeeds.
sys.exit(1 if sys.argv[1:5] == ['compute', 'tpus', 'queued-resources', 'describe'] else 0)
'''


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  return bin_dir, tmp_path / 'gcloud.jsonl'


def run_script(step, accelerator, fake_gcloud, dry_run):
  bin_dir, log = fake_gcloud
  zone, _ = SLICES[accelerator]
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ('PROJECT', 'RUNTIME_VERSION', 'DATA_DIR', 'GCLOUD_SSH_FLAGS')
  }
  env.update(
      PATH=f'{bin_dir}:{env["PATH"]}',
      FAKE_GCLOUD_LOG=str(log),
      TPU_NAME='pod',
      ZONE=zone,
      ACCELERATOR_TYPE=accelerator,
      BUCKET='gs://my-bucket/',
      DRY_RUN='1' if dry_run else '0',
  )
  log.unlink(missing_ok=True)
  proc = subprocess.run(
      ['bash', str(LAUNCH / STEPS[step][0]), *STEPS[step][1:]],
      env=env,
      cwd=REPO,
      check=False,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return proc.stdout, calls


def printed(stdout):
  """The commands a dry run prints ('+ cmd'), each with the script it would send."""
  commands, script = [], None
  for line in stdout.splitlines():
    if line.startswith('+ '):
      commands.append({'argv': shlex.split(line[2:])[1:]})
    elif line == '--- SCRIPT ---':
      script = []
    elif line == '--- END SCRIPT ---':
      commands[-1]['script'] = '\n'.join(script) + '\n'
      script = None
    elif script is not None:
      script.append(line)
  return commands


def without_time(command):
  """A command with the parts that differ between two runs made equal: the training run's
  time stamp and the scp's temporary file."""
  argv = [
      re.sub(r'^/tmp/[^ ]*/convnext_jax_src\.tar\.gz$', 'SRC.tar.gz', a) for a in command['argv']
  ]
  argv = [re.sub(r'--command=bash -c .*', '--command=SCRIPT', a) for a in argv]
  script = re.sub(r'STAMP=\d{8}_\d{6}', 'STAMP=T', command.get('script', ''))
  return {'argv': argv, 'script': script}


@pytest.mark.parametrize('accelerator', list(SLICES))
@pytest.mark.parametrize('step', list(STEPS))
def test_dry_run_prints_what_the_real_run_does(step, accelerator, fake_gcloud):
  dry_stdout, dry_calls = run_script(step, accelerator, fake_gcloud, dry_run=True)
  assert dry_calls == []  # A dry run calls no gcloud at all.
  _, calls = run_script(step, accelerator, fake_gcloud, dry_run=False)
  real = [
      without_time(c)
      for c in calls
      if c['argv'][:4] != ['compute', 'tpus', 'queued-resources', 'describe']
  ]
  assert [without_time(c) for c in printed(dry_stdout)] == real

  zone, version = SLICES[accelerator]
  tpu = ['pod', f'--zone={zone}']
  argvs = [c['argv'] for c in calls]
  if step == 'create':
    assert argvs == [
        [
            'compute',
            'tpus',
            'tpu-vm',
            'create',
            *tpu,
            f'--version={version}',
            f'--accelerator-type={accelerator}',
        ]
    ]
  elif step == 'setup':
    assert [a[:4] for a in argvs] == [
        ['compute', 'tpus', 'tpu-vm', 'scp'],
        ['compute', 'tpus', 'tpu-vm', 'ssh'],
    ]
    assert argvs[0][5:] == ['pod:convnext_jax_src.tar.gz', f'--zone={zone}', '--worker=all']
    files = calls[0]['files']  # The checkout, without its venv.
    assert {'convnext_jax/train.py', 'launch/common.sh', CONFIG} <= set(files)
    assert not any(f.startswith('.venv') for f in files)
    assert argvs[1][4:7] == [*tpu, '--worker=all']
    assert "pip install -e '.[$EXTRAS]'" in calls[1]['script']
    assert 'EXTRAS=tpu' in calls[1]['script']
  elif step == 'train':
    assert len(argvs) == 1 and argvs[0][:7] == [
        'compute',
        'tpus',
        'tpu-vm',
        'ssh',
        *tpu,
        '--worker=all',
    ]
    assert (
        'MAIN_ARGS=(-m convnext_jax.main --config configs/convnext_b_in22k.py --workdir '
        'gs://my-bucket/b22k --jax_distributed --config.grad_accum_steps=2 )'
    ) in calls[0]['script']
    assert 'ENV_ARGS=(TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets )' in calls[0]['script']
  elif step == 'stop':
    assert argvs[0][:7] == ['compute', 'tpus', 'tpu-vm', 'ssh', *tpu, '--worker=all']
    assert 'kill -TERM -- "-$pgid"' in calls[0]['script']
  else:
    assert argvs == [
        [
            'compute',
            'tpus',
            'queued-resources',
            'describe',
            'pod-qr',
            f'--zone={zone}',
            '--format=value(name)',
        ],
        ['compute', 'tpus', 'tpu-vm', 'delete', *tpu, '--quiet'],
    ]


def _bash(script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
  """Runs a launch script's remote command as the worker's shell would, output captured."""
  return subprocess.run(
      ['bash', '-c', script], env=env, check=False, capture_output=True, text=True, timeout=timeout
  )


def test_the_workers_start_the_trainer_detached_and_stop_it(fake_gcloud, tmp_path):
  """The train and --stop scripts the workers receive, run in a scratch home whose venv
  Python records its arguments and waits for SIGTERM."""
  _, (train_call,) = run_script('train', 'v4-32', fake_gcloud, dry_run=False)
  _, (stop_call,) = run_script('stop', 'v4-32', fake_gcloud, dry_run=False)
  home = tmp_path / 'home'
  (home / 'convnext_jax' / 'configs').mkdir(parents=True)
  (home / 'convnext_jax' / CONFIG).write_text('')
  python = home / 'convnext_venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(
      '#!/usr/bin/env bash\n'
      'printf "%s\\n" "$PWD" "TFDS_DATA_DIR=$TFDS_DATA_DIR" "$@" > "$HOME/argv"\n'
      'trap \'echo SIGTERM > "$HOME/signal"; exit 0\' TERM\n'
      'sleep 60 & wait\n'
  )
  python.chmod(0o755)
  env = dict(os.environ, HOME=str(home))
  started = _bash(train_call['script'], env, timeout=30)
  assert started.returncode == 0, started.stderr
  pgid = int((home / 'convnext_logs' / 'train.pid').read_text())
  try:
    for _ in range(100):
      if (home / 'argv').exists():
        break
      time.sleep(0.1)
    assert (home / 'argv').read_text().splitlines() == [
        str(home / 'convnext_jax'),
        'TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets',
        '-m',
        'convnext_jax.main',
        '--config',
        CONFIG,
        '--workdir',
        'gs://my-bucket/b22k',
        '--jax_distributed',
        '--config.grad_accum_steps=2',
    ]
    # A second start on the same worker is refused while this one runs.
    again = _bash(train_call['script'], env, timeout=30)
    assert again.returncode == 1 and 'already going' in again.stdout
    stopped = _bash(stop_call['script'], env, timeout=60)
    assert stopped.returncode == 0 and 'stopped' in stopped.stdout, stopped.stdout
    assert (home / 'signal').read_text() == 'SIGTERM\n'
    log = (home / 'convnext_logs' / 'train_latest.log').read_text()
    assert 'exited with status 0' in log
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(pgid, signal.SIGKILL)
