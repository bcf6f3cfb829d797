"""The roadmap study: configs/roadmap.py configures every step of both tracks (EMA off, the
Table 5 recipe, `:runlocal` and `:mini`), its docstring lists the paper's numbers, and
`python -m convnext_jax.roadmap_study --mini` trains two steps end to end, writes the table (ours
beside the paper's) and a chart that opens, and skips both steps when run again."""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import multiprocess
from PIL import Image
import pytest

from convnext_jax import models
from convnext_jax import validation
from convnext_jax.models import roadmap_net

REPO = pathlib.Path(__file__).resolve().parents[1]
TRACKS = list(roadmap_net.TRACKS)


def _config_module():
  spec = importlib.util.spec_from_file_location('roadmap_config', REPO / 'configs' / 'roadmap.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


get_config = _config_module().get_config


@pytest.mark.parametrize('track', TRACKS)
def test_every_step_is_the_table5_recipe_without_ema(track):
  for step in roadmap_net.TRACKS[track]:
    c = get_config(f'track={track},step={step.name}')
    validation.check(c)
    assert c.model.name == f'roadmap_{track}_{step.name}'
    assert c.model.name in models.list_models('roadmap*')
    assert c.ema.decay == 0.0
    assert c.model.drop_path_rate == {'r50': 0.1, 'r200': 0.5}[track]
    assert (c.dataset.name, c.input.image_size, c.num_epochs, c.global_batch_size) == (
        'imagenet2012',
        224,
        300.0,
        4096,
    )
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_epochs) == (4e-3, 0.05, 20.0)
    assert (
        c.input.randaugment,
        c.input.mixup_alpha,
        c.input.cutmix_alpha,
        c.input.random_erasing,
        c.input.label_smoothing,
    ) == ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25, 0.1)
    assert not c.model.overrides  # The registered model as it is.


@pytest.mark.parametrize('track', TRACKS)
@pytest.mark.parametrize('arg', ['runlocal', 'mini', 'mini,runlocal'])
def test_runlocal_and_mini_configure_every_step(track, arg):
  for step in roadmap_net.TRACKS[track]:
    c = get_config(f'track={track},step={step.name},{arg}')
    validation.check(c)
    assert c.model.name == roadmap_net.model_name(track, step.name)
    assert c.ema.decay == 0.0 and c.dataset.name == 'convnext_shapes'
    if 'runlocal' in arg:
      assert 0 < c.num_steps <= 10


def test_defaults_and_errors_name_the_valid_choices():
  assert get_config().model.name == 'roadmap_r50_baseline'
  assert get_config('track=r200').model.name == 'roadmap_r200_baseline'
  steps = ', '.join(step.name for step in roadmap_net.TRACKS['r50'])
  with pytest.raises(
      ValueError, match=f'unknown step .gelu7. of track r50; the steps are {steps}$'
  ):
    get_config('step=gelu7')
  with pytest.raises(ValueError, match="unknown track 'r101'; the tracks are r50, r200$"):
    get_config('track=r101,step=gelu')
  with pytest.raises(ValueError, match=r"unknown argument\(s\) \['size'\]"):
    get_config('step=gelu,size=32')


def test_docstring_lists_every_step_with_the_papers_numbers_and_the_commands():
  doc = _config_module().__doc__
  assert 'python -m convnext_jax.main --config configs/roadmap.py:track=r50,step=' in doc
  assert 'python -m convnext_jax.roadmap_study --workdir' in doc
  for r50, r200 in zip(roadmap_net.TRACKS['r50'], roadmap_net.TRACKS['r200']):
    row = (
        rf'\n  {r50.name} +{re.escape(r50.title)} +{r50.paper_top1:.2f} +'
        rf'{r50.paper_gflops:.2f} +\| +{r200.paper_top1:.2f} +{r200.paper_gflops:.2f}\n'
    )
    assert re.search(row, doc), r50.name


# The mini preset's shapes, written out: what each step becomes on a CPU.
MINI_R50 = {
    'baseline': ((1, 1, 2, 1), (16, 32, 64, 128)),
    'stage_ratio': ((1, 1, 3, 1), (16, 32, 64, 128)),
    'width': ((1, 1, 3, 1), (24, 48, 96, 192)),
    'downsample': ((1, 1, 3, 1), (24, 48, 96, 192)),
}


def test_mini_keeps_each_change_and_reaches_1x1_at_32px():
  for step in roadmap_net.TRACKS['r50']:
    c = get_config(f'step={step.name},mini')
    depths, widths = c.model.overrides.depths, c.model.overrides.widths
    if step.name in MINI_R50:
      assert (depths, widths) == MINI_R50[step.name], step.name
    model = models.create_model(c.model.name, num_classes=10, depths=depths, widths=widths)
    size = c.input.image_size
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    stages = jax.eval_shape(
        lambda x, m=model: m.init_with_output(jax.random.key(0), x, output='stages')[0], images
    )
    assert [s.shape[1] for s in stages] == [8, 4, 2, 1], step.name
  r200 = get_config('track=r200,step=baseline,mini').model.overrides
  assert (r200.depths, r200.widths) == ((1, 3, 4, 1), (16, 32, 64, 128))


def test_study_applies_arguments_and_overrides_to_every_step_and_refuses_what_it_sets():
  from convnext_jax import roadmap_study as study  # pylint: disable=g-import-not-at-top (its flags)

  steps = study.select_steps('r50', ['downsample', 'baseline'])
  assert [step.name for step in steps] == ['baseline', 'downsample']  # Roadmap order.
  configs = study.step_configs(
      f'{study.DEFAULT_CONFIG}:runlocal', {'optim.lr': 1e-3}, 'r50', steps, mini=True
  )
  for name, c in configs.items():
    assert c.model.name == f'roadmap_r50_{name}' and c.optim.lr == 1e-3
    assert c.num_steps == 6 and (c.model.overrides.depths, c.model.overrides.widths) == (
        MINI_R50[name]
    )
  with pytest.raises(
      ValueError, match='unknown step.s. foo of track r50; the steps are baseline,stage_ratio,'
  ):
    study.select_steps('r50', ['foo', 'gelu'])
  with pytest.raises(ValueError, match='choose them with --track and --steps'):
    study.step_configs(f'{study.DEFAULT_CONFIG}:track=r200', {}, 'r50', steps, mini=False)
  with pytest.raises(ValueError, match="study sets each step's model"):
    study.step_configs(
        study.DEFAULT_CONFIG, {'model.name': 'convnext_tiny'}, 'r50', steps, mini=False
    )
  with pytest.raises(validation.ConfigError, match='global_batch_size must be a positive'):
    study.step_configs(study.DEFAULT_CONFIG, {'global_batch_size': 0}, 'r50', steps, mini=False)


# A tiny budget: 3 steps, one evaluation, one checkpoint.
TINY = (
    '--config.num_steps=3',
    '--config.optim.warmup_steps=1',
    '--config.log_every_steps=3',
    '--config.eval_every_steps=3',
    '--config.checkpoint_every_steps=3',
    '--config.eval_batch_size=500',
)
STEPS = ('baseline', 'downsample')  # A BatchNorm ResNet and ConvNeXt-T, in mini.


def _study(workdir: str, data_dir: str) -> tuple[str, str, float]:
  env = multiprocess.cpu_env()
  command = [
      sys.executable,
      '-m',
      'convnext_jax.roadmap_study',
      '--workdir',
      workdir,
      '--mini',
      f'--steps={",".join(STEPS)}',
      f'--config.dataset.data_dir={data_dir}',
      *TINY,
  ]
  start = time.perf_counter()
  proc = subprocess.run(
      command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout, proc.stderr, time.perf_counter() - start


def _mini_model(name: str):
  depths, widths = MINI_R50[name]
  return models.create_model(
      roadmap_net.model_name('r50', name), num_classes=10, depths=depths, widths=widths
  )


def test_mini_study_trains_two_steps_writes_table_and_chart_then_skips(shapes_dir, tmp_path):
  workdir = str(tmp_path / 'study')
  out, err, first_s = _study(workdir, shapes_dir)
  for i, name in enumerate(STEPS, start=1):
    assert f'[{i}/2] {name} (' in out and 'training roadmap_r50_' in out, out
    result = json.loads((tmp_path / 'study' / name / 'roadmap_result.json').read_text())
    assert result['train_steps'] == 3 and result['images_per_sec'] > 0
    assert 0.0 <= result['top1'] <= 1.0 and result['preset'] == 'mini'
  assert 'compiling the train step' in err

  # The table: one row per step, ours (params and multiply-adds counted here independently,
  # at 32 px) beside the paper's top-1 and GFLOPs at 224.
  text = (tmp_path / 'study' / 'roadmap.md').read_text()
  rows = [line.split('|')[1:-1] for line in text.splitlines() if re.match(r'\| \d', line)]
  assert [row[1].strip() for row in rows] == list(STEPS), text
  for row, step in zip(rows, (roadmap_net.TRACKS['r50'][0], roadmap_net.TRACKS['r50'][-1])):
    number, _, title, params, macs, paper_gflops, top1, paper_top1, img_s, _ = (
        cell.strip() for cell in row
    )
    model = _mini_model(step.name)
    assert number == str(roadmap_net.TRACKS['r50'].index(step) + 1) and title == step.title
    assert params == f'{models.count_params(models.param_shapes(model, 32)):,}'
    expected_macs = models.count_macs(model.clone(depthwise_impl='conv'), 32) / 1e9
    assert macs.endswith(' (32)') and float(macs.split()[0]) == pytest.approx(
        expected_macs, rel=5e-3
    )
    assert (paper_top1, paper_gflops) == (f'{step.paper_top1:.2f}', f'{step.paper_gflops:.2f}')
    assert 0 <= float(top1) <= 100 and float(img_s) > 0
  assert "Trends at this scale are not the paper's" in text

  with Image.open(tmp_path / 'study' / 'roadmap.png') as image:
    assert image.format == 'PNG'
    width, height = image.size
    image.load()
  assert width > 800 and height > 200, image.size

  # Again: both steps are finished, so neither trains; the table is written the same.
  (tmp_path / 'study' / 'roadmap.md').unlink()
  out, err, second_s = _study(workdir, shapes_dir)
  for i, name in enumerate(STEPS, start=1):
    assert re.search(rf'\[{i}/2\] {name}: finished before \(top-1 .*\), skipping', out), out
  assert 'compiling the train step' not in err and 'training roadmap' not in out, out + err
  assert (tmp_path / 'study' / 'roadmap.md').read_text() == text
  assert second_s < first_s, (first_s, second_s)
