"""The training system end to end on the built-in dataset: a short run of the demo through
`python -m convnext_jax.main` (one CPU device, as the demo runs on this machine) learns well
above chance, evaluates and checkpoints; its TensorBoard events hold the logged scalars; the
conversion CLI exports from its workdir; fine-tuning from a converted checkpoint with a new
10-class head re-initialises the head and learns. (Resuming is test_batchnorm_training's.)

The full demo's result (top-1, wall time) is recorded in docs/benchmarks.md."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import multiprocess
import numpy as np
import pytest
from safetensors.numpy import save_file
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from convnext_jax import checkpoints
from convnext_jax import config_lib
from convnext_jax import console
from convnext_jax import convert
from convnext_jax import convert_cli
from convnext_jax import optim
from convnext_jax import run
from convnext_jax import sharding
from convnext_jax import train
from convnext_jax.data import DatasetFacts

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_STEPS = 100
CHECKPOINT_EVERY = 50
CHANCE = 0.1


def _demo_config(arg=None):
  spec = importlib.util.spec_from_file_location('demo_config', REPO / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# configs/demo.py cut to fit the suite: 100 steps (1.3 epochs) at 32 px, under a minute.
SHORT_DEMO_FLAGS = (
    '--config.input.image_size=32',
    f'--config.num_steps={DEMO_STEPS}',
    '--config.optim.warmup_steps=15',
    '--config.log_every_steps=25',
    f'--config.eval_every_steps={DEMO_STEPS}',
    f'--config.checkpoint_every_steps={CHECKPOINT_EVERY}',
)


def run_main(workdir: str, data_dir: str, *flags: str) -> str:
  """`python -m convnext_jax.main --config configs/demo.py` on one CPU device; returns what
  it printed (stdout and stderr)."""
  env = multiprocess.cpu_env(fast_compile=False)  # 100 steps: optimised code pays.
  env.pop('TF_CPP_MIN_LOG_LEVEL')  # The suite's (conftest.py): the console a user sees.
  command = [
      sys.executable,
      *multiprocess.trainer_args(REPO / 'configs' / 'demo.py', workdir, data_dir, *flags),
  ]
  proc = subprocess.run(command, env=env, cwd=REPO, check=False, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # TensorFlow was set up before anything ran it (pipeline.configure_tensorflow's warning).
  assert 'intra-op thread pool' not in proc.stderr, proc.stderr[-4000:]
  return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def demo_run(shapes_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  console = run_main(workdir, shapes_dir, *SHORT_DEMO_FLAGS)
  config = _demo_config()
  config.num_steps = DEMO_STEPS
  config.optim.warmup_steps = 15
  _, meta = checkpoints.load_params(workdir, which='ema')
  return workdir, config, meta['metrics'], console


def test_short_demo_learns_evaluates_and_checkpoints(demo_run):
  workdir, _, result, _ = demo_run
  assert set(result) == {f'convnext_shapes/{w}/top{k}' for w in ('raw', 'ema') for k in (1, 5)}
  for value in result.values():  # Fractions of the 1000 validation images.
    assert 0.0 <= value <= 1.0 and round(value * 1000) == pytest.approx(value * 1000, abs=1e-3)
  assert result['convnext_shapes/raw/top5'] >= result['convnext_shapes/raw/top1']
  # 1.3 epochs take a fresh atto from chance to about a third (measured 33.2% raw, 32.3% EMA).
  assert result['convnext_shapes/raw/top1'] > 2.5 * CHANCE, result
  assert result['convnext_shapes/ema/top1'] > 2.5 * CHANCE, result
  # Checkpoints every 50 steps and at the end; none at step 1.
  assert checkpoints.workdir_steps(workdir) == [CHECKPOINT_EVERY, DEMO_STEPS]


# console.duration: '42 s', '1 min 05 s' (a compile on a busy machine), '3 h 12 min'.
DURATION = r'(\d+ s|\d+ min \d\d s|\d+ h \d\d min)'
# An absl log line: level, date, time, thread, then `file.py:line]`.
_LOG_LINE = re.compile(r'([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)')


def test_console_shows_progress_and_results_not_library_chatter(demo_run):
  """The demo's console at default verbosity: every INFO line is the trainer's own (no
  orbax, tensorstore, clu or jax records; orbax alone wrote ~450 lines per demo before),
  nothing from TensorFlow's C++ side, and the lines a user reads are all there."""
  workdir, _, _, console = demo_run
  lines = console.splitlines()
  ours = {f.name for f in (REPO / 'convnext_jax').rglob('*.py')}
  sources = [m.group(2) for m in map(_LOG_LINE.fullmatch, lines) if m and m.group(1) == 'I']
  assert sources and set(sources) <= ours, sorted(set(sources) - ours)
  for noise in ('oneDNN', 'absl::InitializeLog', 'replica_slices', 'orbax', 'Setting work unit'):
    assert noise not in console, [line for line in lines if noise in line]
  assert not [line for line in lines if not _LOG_LINE.fullmatch(line)], console
  messages = [m.group(3) for m in map(_LOG_LINE.fullmatch, lines)]
  assert len(messages) < 30, console

  def one(pattern):
    found = [m for m in messages if re.fullmatch(pattern, m)]
    assert len(found) == 1, (pattern, console)

  one(r'config: convnext_atto \(float32\) on convnext_shapes at 32 px, batch 64, 100 steps, .*')
  one(
      rf'first batch in {DURATION}; compiling the train step \(convnext_atto, batch 64 at 32 px, '
      r'mesh .*\) \.\.\.'
  )
  one(rf'compiled the train step in {DURATION}')
  for step in range(25, DEMO_STEPS + 1, 25):  # log_every_steps=25.
    one(
        rf'step {step}/{DEMO_STEPS} \({100 * step / DEMO_STEPS:.1f}%\): loss \d\.\d{{4}}, '
        rf'[\d.]+ img/s, [\d.]+ steps/s, ETA {"-" if step == DEMO_STEPS else ".*s"}'
    )
  one(
      rf'step {DEMO_STEPS}, convnext_shapes \(1000 images, [\d.]+ s\): '
      r'ema top-1 [\d.]+% top-5 [\d.]+%, raw top-1 [\d.]+% top-5 [\d.]+%'
  )
  for step in (CHECKPOINT_EVERY, DEMO_STEPS):
    one(
        rf'checkpoint step {step}: writing in the background to {re.escape(workdir)}/'
        rf'checkpoints/{step}'
    )


def test_tensorboard_events_hold_the_logged_scalars(demo_run):
  workdir, config, result, _ = demo_run
  files = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert files, os.listdir(workdir)
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()

  def series(tag):
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}

  tags = set(acc.Tags()['tensors'])
  for tag in (
      'train/loss',
      'train/lr',
      'train/grad_norm',
      'train/param_norm',
      'train/images_per_sec',
      'train/epoch',
      'steps_per_sec',
      'convnext_shapes/raw/top1',
      'convnext_shapes/ema/top1',
      'convnext_shapes/raw/top5',
      'convnext_shapes/ema/top5',
  ):
    assert tag in tags, (tag, sorted(tags))
  lr = series('train/lr')
  assert sorted(lr) == list(range(25, DEMO_STEPS + 1, 25))
  sched = optim.lr_schedule(config.optim.lr, config.optim.min_lr, 15, DEMO_STEPS)
  for step, value in lr.items():  # The last step of each window logs its lr.
    assert value == pytest.approx(float(sched(step - 1)), rel=1e-6)
  images, steps = series('train/images_per_sec'), series('steps_per_sec')
  assert sorted(images) == sorted(steps) == sorted(lr)
  for step, value in images.items():
    assert value == pytest.approx(config.global_batch_size * steps[step], rel=1e-5)
  loss = series('train/loss')  # From about ln(10) = 2.30 down, as the accuracy rises.
  assert 2.0 < loss[25] < 2.5 and loss[DEMO_STEPS] < loss[25] - 0.3, loss
  top1 = series('convnext_shapes/raw/top1')
  assert top1 == {DEMO_STEPS: pytest.approx(result['convnext_shapes/raw/top1'])}


def test_export_from_workdir(demo_run, tmp_path):
  workdir, _, _, _ = demo_run
  out = tmp_path / 'demo_raw50.safetensors'
  assert convert_cli.main(['export', workdir, str(out), '--params', 'raw', '--step', '50']) == 0
  from safetensors.numpy import load_file

  name, params = convert.torch_to_flax(load_file(out))
  assert name == 'convnext_atto'
  raw50, _ = checkpoints.load_params(workdir, which='raw', step=50)
  jax.tree.map(np.testing.assert_array_equal, params, raw50)
  latest_raw, _ = checkpoints.load_params(workdir, which='raw')
  assert not np.array_equal(latest_raw['head']['kernel'], raw50['head']['kernel'])
  _, meta = checkpoints.load_params(workdir, which='ema')
  assert meta['step'] == DEMO_STEPS and meta['weights'] == 'ema'
  assert meta['class_names'][:2] == ['circle', 'square']


def test_finetune_from_converted_checkpoint_with_a_new_head(demo_run, shapes_dir, tmp_path):
  """An 'ImageNet' checkpoint (the demo backbone under a 1000-class head, written as timm
  safetensors and imported by the CLI) fine-tuned on the 10 classes: the head is re-made at
  head_init_scale, the backbone is taken over exactly, and the run learns from there."""
  workdir, _, _, _ = demo_run
  backbone, _ = checkpoints.load_params(workdir, which='ema')
  rng = np.random.default_rng(0)
  pretrained = dict(
      backbone,
      head={
          'kernel': (0.02 * rng.standard_normal((320, 1000))).astype(np.float32),
          'bias': np.zeros(1000, np.float32),
      },
  )
  src = tmp_path / 'atto_in1k.safetensors'
  save_file(convert.flax_to_torch(pretrained, 'convnext_atto', layout='timm'), str(src))
  ckpt = tmp_path / 'atto_in1k'
  assert convert_cli.main(['import', str(src), str(ckpt)]) == 0

  # The merge itself: backbone exact, head new and small.
  config = _demo_config()
  config.model.head_init_scale = 0.001
  model = run.model_from_config(config, 10)
  fresh = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  merged, report, _ = checkpoints.load_params_into(str(ckpt), fresh['params'])
  assert report['reinitialized'] == [
      'head/bias (1000,) -> (10,)',
      'head/kernel (320, 1000) -> (320, 10)',
  ]
  np.testing.assert_array_equal(
      merged['downsample_layers.0.0']['kernel'], backbone['downsample_layers.0.0']['kernel']
  )
  head = np.asarray(merged['head']['kernel'])  # Truncated normal, std 0.02, x head_init_scale.
  assert 0.8 * 2e-5 < head.std() < 1.2 * 2e-5 and not np.asarray(merged['head']['bias']).any()
  loaded, _ = checkpoints.load_params(str(ckpt))
  checkpoints.save_params(
      str(tmp_path / 'extra'),
      dict(loaded, extra={'kernel': np.zeros(2)}),
      {'model_name': 'convnext_atto', 'num_classes': 1000},
  )
  with pytest.raises(checkpoints.CheckpointError, match='unexpected 1: extra/kernel'):
    checkpoints.load_params_into(str(tmp_path / 'extra'), fresh['params'])

  # Fine-tuning through the training entry point, with the short demo's schedule (so its train
  # step is the demo run's program, read from the suite's compilation cache). The new head
  # starts at chance (its logits are ~1e-3 of the backbone's); the run takes it well above.
  finetune_dir = str(tmp_path / 'finetune')
  run_main(
      finetune_dir,
      shapes_dir,
      f'--config.init_from.path={ckpt}',
      '--config.model.head_init_scale=0.001',
      *SHORT_DEMO_FLAGS,
  )
  tuned, meta = checkpoints.load_params(finetune_dir, which='raw')
  assert meta['num_classes'] == 10 and tuned['head']['kernel'].shape == (320, 10)
  assert meta['metrics']['convnext_shapes/raw/top1'] > 2.5 * CHANCE, meta['metrics']
  stem = 'downsample_layers.0.0'  # The backbone is fine-tuned too, not frozen.
  assert np.abs(tuned[stem]['kernel'] - backbone[stem]['kernel']).max() > 0


def test_throughput_and_eta_leave_out_evaluation(monkeypatch):
  """img/s and steps/s count training time only; the ETA adds the evaluations still to come
  at their measured length. A fake clock: 10 steps of 0.5 s with a 20 s evaluation inside
  the window, batch 32, 100 steps with an evaluation every 50."""
  now = [1000.0]
  monkeypatch.setattr(train.time, 'perf_counter', lambda: now[0])
  progress = train._Progress(run.Schedule(10, 100, 0, 50), 32)
  for step in range(1, 11):
    now[0] += 0.5
    progress.steps += 1
    if step == 5:
      with progress.paused(evaluating=True):
        now[0] += 20.0
  scalars = progress.report(10, 1.0)
  assert scalars['steps_per_sec'] == pytest.approx(10 / 5.0)
  assert scalars['train/images_per_sec'] == pytest.approx(32 * 10 / 5.0)
  assert scalars['train/epoch'] == pytest.approx(1.0)
  # A checkpoint wait is left out of the rate too, but is not an evaluation for the ETA.
  for _ in range(10):
    now[0] += 0.25
    progress.steps += 1
  with progress.paused():
    now[0] += 7.0
  logged = []
  monkeypatch.setattr(train.logging, 'info', lambda msg, *args: logged.append(msg % args))
  scalars = progress.report(20, 1.0)
  assert scalars['steps_per_sec'] == pytest.approx(10 / 2.5)
  # 80 steps left at the run's 7.5 s per 20 steps, and evaluations at 50 and 100 at 20 s each.
  assert logged[-1].endswith(f'ETA {console.duration(80 * 7.5 / 20 + 2 * 20.0)}'), logged


def test_the_training_randomness_comes_from_the_seed_it_is_given():
  """The state's rng and weights derive from config.seed's key alone: the weights are
  `model.init(key(seed))`, and the rng is none of the keys other seeds initialise from."""
  config = config_lib.base()
  config.model.name = 'convnext_atto'
  config.model.overrides.depths = (1, 1, 1, 1)
  config.model.overrides.dims = (8, 16, 32, 64)
  config.seed = 3
  config.input.image_size = 32
  config.mesh = (1, 1, 1)
  r = run.Run.build(
      config, DatasetFacts(1000, 10), sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  )
  state = r.init_state()
  model = r.model
  # Jitted, as the state's init is: eager and compiled truncated normals differ in the last bit.
  init = jax.jit(model.init)
  expected = init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))['params']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']), expected)
  rng = np.asarray(state['rng'])
  for seed in range(8):
    assert not np.array_equal(rng, jax.random.key_data(jax.random.key(seed))), seed
