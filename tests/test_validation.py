"""Config mistakes end before anything heavy: one line on stderr, exit status 2, no workdir.

`validation.check` is tested in-process over one mistake per key family (and with a mesh,
for the batch splits); `main.main` in process for the exit status of each outcome (a config
the trainer's checks refuse: 2, before the workdir exists; a run-time error: 1);
`validation.command_line` in process for mistakes in the config argument and its keys; and
`python -m convnext_jax.main` in subprocesses (two at a time) for what only a process shows:
one mistake found at each stage (before absl parses the flags, by absl, by the config
loader, by the trainer's checks), the exit status and the last line on stderr.
"""

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import types

import multiprocess
import pytest

from convnext_jax import configs
from convnext_jax import main
from convnext_jax import train
from convnext_jax import validation

REPO = pathlib.Path(__file__).resolve().parents[1]
ATTO_SIZE = (
    "an integer >= 32 (convnext_atto's stem and 3 downsamples divide it by 32; "
    'smaller leaves an empty feature map)'
)
# ConvNeXt's module attributes (models/convnext.py), as create_model takes them.
ATTO_ARGUMENTS = (
    'depths',
    'depthwise_impl',
    'dims',
    'drop_path_rate',
    'dtype',
    'head_init_scale',
    'init_scheme',
    'layer_scale_init_value',
    'norm_eps',
    'num_classes',
    'param_dtype',
    'remat',
    'scan',
    'use_grn',
)
SHAPES_DATASETS = (
    'convnext_shapes, imagenet2012, imagenet22k, class_folder, imagenet_v2, '
    'imagenet2012_real (README "Datasets")'
)


def _config_file(name: str, arg=None):
  """configs/<name> loaded by the loader `--config` uses, with `arg` after the colon."""
  return configs.load(str(REPO / 'configs' / name) + (f':{arg}' if arg else ''))


def _demo(**overrides):
  """configs/demo.py:runlocal with dotted-key overrides, e.g. **{'optim.lr': 0.1}."""
  config = _config_file('demo.py', 'runlocal')
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


# ---------------------------------------------------------------------------------------
# validation.check, in process.

CHECK_CASES = [
    ({'global_batch_size': 0}, 'config.global_batch_size must be a positive integer, got 0'),
    (
        {'global_batch_size': 32, 'grad_accum_steps': 3},
        'config.global_batch_size 32 is not divisible by config.grad_accum_steps 3',
    ),
    (
        {'model.overrides': {'dimz': (8, 16, 32, 64)}},
        "config.model.overrides.dimz is not an argument of convnext_atto (did you mean 'dims'?); "
        f'its arguments are {", ".join(ATTO_ARGUMENTS)}',
    ),
    (
        {'model.overrides': {'dtype': 'bfloat16'}},
        'config.model.overrides.dtype: set config.model.dtype instead',
    ),
    (
        {'dataset.eval_split': 'validation[:64'},
        "config.dataset.eval_split 'validation[:64' is not a tfds split: a name, a slice such "
        "as 'validation[:64]' or 'train[:10%]', or a sum of them joined by '+'",
    ),
    ({'grad_accum_steps': 0}, 'config.grad_accum_steps must be a positive integer, got 0'),
    (
        {'eval_batch_size': 0},
        'config.eval_batch_size must be a positive integer, or -1 for global_batch_size, got 0',
    ),
    (
        {'model.dtype': 'float64'},
        "config.model.dtype must be one of 'float32', 'bfloat16', 'float16', got 'float64' "
        "(did you mean 'float16'?)",
    ),
    (
        {'model.name': 'convnext_tiney'},
        "config.model.name 'convnext_tiney' is not a registered model (did you mean "
        "'convnext_tiny'?); see models.list_models()",
    ),
    (
        {'mesh': ('abc',)},
        "config.mesh must be 3 integers for ('data', 'fsdp', 'model'), each >= 1 or one -1 for "
        "the remaining devices, got ('abc',); e.g. --config.mesh=-1,1,1",
    ),
    (
        {'mesh': (-1, -1, 1)},
        "config.mesh must be 3 integers for ('data', 'fsdp', 'model'), each >= 1 or one -1 for "
        'the remaining devices, got (-1, -1, 1); e.g. --config.mesh=-1,1,1',
    ),
    (
        {'mesh': (2, 0, 1)},
        "config.mesh must be 3 integers for ('data', 'fsdp', 'model'), each >= 1 or one -1 for "
        'the remaining devices, got (2, 0, 1); e.g. --config.mesh=-1,1,1',
    ),
    ({'input.image_size': -5}, f'config.input.image_size must be {ATTO_SIZE}, got -5'),
    ({'input.image_size': 31}, f'config.input.image_size must be {ATTO_SIZE}, got 31'),
    (
        {'input.eval_image_size': 16},
        f'config.input.eval_image_size must be {ATTO_SIZE}, or -1 for input.image_size, got 16',
    ),
    (
        {'model.name': 'convnext_isotropic_small', 'input.image_size': 15},
        'config.input.image_size must be an integer >= 16 (convnext_isotropic_small cuts it into '
        '16x16 patches), got 15',
    ),
    (
        {'input.crop_pct': 1.5},
        'config.input.crop_pct must be a number in (0, 1], or -1 for 0.875 below 384 px, 1.0 '
        'from 384, got 1.5',
    ),
    (
        {'input.crop_mode': 'centre'},
        "config.input.crop_mode must be one of 'center', 'squash', got 'centre' (did you mean "
        "'center'?)",
    ),
    (
        {'input.scale': (0.5, 0.1)},
        'config.input.scale must be 2 numbers (min, max), 0 < min <= max <= 1, got (0.5, 0.1)',
    ),
    ({'input.hflip': 2.0}, 'config.input.hflip must be a probability in [0, 1], got 2.0'),
    (
        {'input.randaugment': 'rand-x9'},
        "config.input.randaugment: RandAugment spec 'rand-x9': cannot read section 'x9'; expected "
        "one of ['inc', 'm', 'mmax', 'mstd', 'n', 'p'] followed by a number; or '' for none",
    ),
    (
        {'input.fill': (1, 2)},
        'config.input.fill must be an RGB colour, 3 numbers in [0, 255], got (1, 2)',
    ),
    (
        {'dataset.name': 'nosuch'},
        (
            "config.dataset.name 'nosuch' is not a tfds dataset; this project builds "
            f'{SHAPES_DATASETS}'
        ),
    ),
    (
        {'dataset.name': 'imagenet2013'},
        "config.dataset.name 'imagenet2013' is not a tfds dataset (did you mean 'imagenet2012'?); "
        f'this project builds {SHAPES_DATASETS}',
    ),
    (
        {'dataset.extra_eval': ('imagenet_v2',)},
        "config.dataset.extra_eval entries must be 'name:split[:label_key]', e.g. "
        "'imagenet_v2:test:label', got 'imagenet_v2'",
    ),
    (
        {'dataset.extra_eval': ('imagenet_v3:test',)},
        "config.dataset.extra_eval 'imagenet_v3' is not a tfds dataset (did you mean "
        f"'imagenet_v2'?); this project builds {SHAPES_DATASETS}",
    ),
    (
        {'num_steps': 0},
        'config.num_steps must be a positive integer, or -1 to train for num_epochs, got 0',
    ),
    ({'num_steps': -1, 'num_epochs': 0.0}, 'config.num_epochs must be a number > 0, got 0.0'),
    (
        {'optim.lr': -1e-3},
        'config.optim.lr must be a number >= 0 (0: the weights stay as they are), got -0.001',
    ),
    (
        {'optim.layer_decay_scheme': 'per_block'},
        "config.optim.layer_decay_scheme must be one of 'group', 'single', got 'per_block'",
    ),
    ({'ema.decay': 1.0}, 'config.ema.decay must be a number in [0, 1) (0: no EMA), got 1.0'),
    ({'log_every_steps': 0}, 'config.log_every_steps must be a positive integer, got 0'),
    (
        {'eval_every_steps': 0},
        'config.eval_every_steps must be a positive integer, or -1 to use eval_every_epochs, '
        'got 0',
    ),
    (
        {'checkpoint_every_steps': -1},
        'config.checkpoint_every_steps must be a positive integer, got -1',
    ),
    ({'keep_checkpoints': 0}, 'config.keep_checkpoints must be a positive integer, got 0'),
    (
        {'nonfinite.action': 'ignore'},
        "config.nonfinite.action must be one of 'skip', 'stop', got 'ignore'",
    ),
    (
        {'nonfinite.max_consecutive': 0},
        'config.nonfinite.max_consecutive must be a positive integer, got 0',
    ),
    (
        {'init_from.path': '/x/convnextv2_atto_1k_224_fcmae.pt'},
        'config.init_from.path /x/convnextv2_atto_1k_224_fcmae.pt is a PyTorch file; convert it '
        'first (convnext-convert import /x/convnextv2_atto_1k_224_fcmae.pt DIR) and give DIR',
    ),
    (
        {'init_from.path': '/nonexistent/convnext_ckpt'},
        'config.init_from.path /nonexistent/convnext_ckpt does not exist; give a training workdir '
        "or a `convnext-convert import` directory, or '' to start from scratch",
    ),
    (
        {'init_from.params': 'best'},
        "config.init_from.params must be one of 'ema', 'raw', got 'best'",
    ),
    (
        {'model.remat': 'dots_savable'},
        "config.model.remat must be '' (off), True/False or one of full, checkpoint_dots, "
        'checkpoint_dots_with_no_batch_dims, dots_saveable, dots_with_no_batch_dims_saveable, '
        "everything_saveable, nothing_saveable, got 'dots_savable' (did you mean "
        "'dots_saveable'?)",
    ),
    (
        {'model.remat': 1},
        "config.model.remat must be '' (off), True/False or one of full, checkpoint_dots, "
        'checkpoint_dots_with_no_batch_dims, dots_saveable, dots_with_no_batch_dims_saveable, '
        'everything_saveable, nothing_saveable, got 1',
    ),
]


@pytest.mark.parametrize(
    'overrides,message',
    CHECK_CASES,
    ids=[' '.join(f'{k}={v}' for k, v in o.items()) for o, _ in CHECK_CASES],
)
def test_check_refuses_with_one_line(overrides, message):
  with pytest.raises(validation.ConfigError) as e:
    validation.check(_demo(**overrides))
  assert str(e.value) == message


def test_check_refuses_unknown_and_missing_keys_of_a_config_file():
  config = _demo()
  config.learning_rate = 1.0  # A config file may add keys: it is not locked.
  with pytest.raises(validation.ConfigError) as e:
    validation.check(config)
  assert str(e.value) == 'config.learning_rate is not a config key; did you mean config.optim.lr?'

  config = _demo()
  del config.nonfinite['max_consecutive']
  with pytest.raises(validation.ConfigError) as e:
    validation.check(config)
  assert str(e.value) == (
      'config.nonfinite.max_consecutive is missing; build configs on '
      'config_lib.base(), which sets every key'
  )


# Every file in configs/, with the arguments it is checked with ({init} and {root} become
# directories that exist). Each is also checked with 'runlocal', which needs neither. A new
# config file fails test_every_config_file_is_in_the_table until it is added here.
SHIPPED_CONFIG_ARGS = {
    'convnext_b_in1k.py': ('',),
    'convnext_b_in1k_ft_384.py': ('init={init}',),
    'convnext_b_in22k.py': ('',),
    'convnext_b_in22k_ft_in1k.py': ('init={init},res=224', 'init={init},res=384'),
    'convnext_iso_b_in1k.py': ('',),
    'convnext_iso_l_in1k.py': ('',),
    'convnext_iso_s_in1k.py': ('',),
    'convnext_l_in1k.py': ('',),
    'convnext_l_in1k_ft_384.py': ('init={init}',),
    'convnext_l_in22k.py': ('',),
    'convnext_l_in22k_ft_in1k.py': ('init={init},res=224', 'init={init},res=384'),
    'convnext_s_in1k.py': ('',),
    'convnext_s_in22k.py': ('',),
    'convnext_s_in22k_ft_in1k.py': ('init={init},res=224', 'init={init},res=384'),
    'convnext_t_in1k.py': ('',),
    'convnext_t_in22k.py': ('',),
    'convnext_t_in22k_ft_in1k.py': (
        'init={init},res=224',
        'init={init},res=384',
        'init={init},step=3,params=raw',
    ),
    'convnext_xl_in22k.py': ('',),
    'convnext_xl_in22k_ft_in1k.py': ('init={init},res=224', 'init={init},res=384'),
    'demo.py': ('',),
    'fcmae_finetune.py': (
        'init={init}',
        'model=tiny,init={init}',
        'model=huge,init={init},res=384',
        'mini,init={init}',
        'mini,scratch',
    ),
    'fcmae_pretrain.py': ('', 'model=base', 'model=huge,epochs=800', 'mini'),
    'finetune_folder.py': (
        'root={root},init={init}',
        'root={root},init={init},model=convnextv2_atto,res=64,epochs=2,batch=8',
    ),
    'roadmap.py': ('', 'track=r200,step=downsample', 'step=fewer_norm,mini', 'track=r200,mini'),
}
# The fine-tuning configs: without init= they raise this, one line (docs/reliability.md).
FINETUNE_NEEDS_INIT = (
    'fine-tuning needs pre-trained weights: append :init=PATH to the config (a training '
    'workdir or a `convnext-convert import` directory)'
)
FINETUNING_CONFIGS = [name for name, args in SHIPPED_CONFIG_ARGS.items() if 'init=' in args[0]]


def test_every_config_file_is_in_the_table():
  assert sorted(path.name for path in (REPO / 'configs').glob('[!_]*.py')) == sorted(
      SHIPPED_CONFIG_ARGS
  )
  # t, s, b, l, xl in22k_ft_in1k; b, l in1k_ft_384; finetune_folder; fcmae_finetune.
  assert len(FINETUNING_CONFIGS) == 9


@pytest.mark.parametrize('name', sorted(path.name for path in (REPO / 'configs').glob('[!_]*.py')))
def test_check_accepts_every_shipped_config(name, tmp_path):
  init, root = tmp_path / 'init', tmp_path / 'root'
  init.mkdir()
  root.mkdir()
  for arg in (*SHIPPED_CONFIG_ARGS[name], 'runlocal'):
    config = _config_file(name, arg.format(init=init, root=root) or None)
    validation.check(config)
    assert config.init_from.path == (str(init) if 'init=' in arg else ''), arg


@pytest.mark.parametrize('name', FINETUNING_CONFIGS)
def test_finetuning_config_without_init_raises_one_line(name, tmp_path):
  # fcmae_finetune's 'mini,scratch' is the --mini track's baseline: random weights on purpose.
  for arg in (a for a in SHIPPED_CONFIG_ARGS[name] if 'scratch' not in a):
    without_init = ','.join(p for p in arg.split(',') if not p.startswith('init='))
    with pytest.raises(ValueError) as e:
      _config_file(name, without_init.format(root=tmp_path) or None)
    assert str(e.value) == FINETUNE_NEEDS_INIT, arg


def test_fcmae_scratch_is_the_mini_baseline_only(tmp_path):
  for arg in (f'mini,scratch,init={tmp_path}', 'scratch'):
    with pytest.raises(ValueError, match='scratch goes with mini and without init='):
      _config_file('fcmae_finetune.py', arg)


def test_finetune_folder_without_root_asks_for_it(tmp_path):
  with pytest.raises(ValueError) as e:
    _config_file('finetune_folder.py', f'init={tmp_path}')
  assert str(e.value) == 'append :root=DIR (root/train/<class>/<image>) to the config'


def test_check_accepts_the_edges(tmp_path):
  validation.check(
      _demo(
          **{
              'input.image_size': 32,
              'mesh': (1, -1, 2),
              'input.crop_pct': 1.0,
              'ema.decay': 0.0,
              'model.overrides.depths': (1, 1, 1, 1),
              'init_from.path': str(tmp_path),
              'dataset.extra_eval': ('imagenet_v2/matched-frequency:test:label',),
              'nonfinite.action': 'stop',
              'nonfinite.max_consecutive': 1,
          }
      )
  )
  validation.check(_demo(**{'model.name': 'convnext_isotropic_small', 'input.image_size': 16}))


@pytest.mark.parametrize('remat', ['', 'full', 'dots_saveable', True, False])
def test_check_accepts_remat_policies_and_the_old_booleans(remat):
  validation.check(_demo(**{'model.remat': remat, 'model.scan': True}))


# ---------------------------------------------------------------------------------------
# main.main, in process: the exit status of each outcome.


@pytest.fixture
def run_main(monkeypatch, capsys, tmp_path):
  """Runs `main.main` on a config (no flags parsed), with the trainer's checks and lock but
  a training that fails at once; returns (status, stderr, trained, workdir)."""
  trained = []

  def fail(config, workdir, *args):
    del config, args
    trained.append(workdir)
    raise train.TrainingError(f'loss is not finite at step 3 in {workdir}; lower optim.lr')

  monkeypatch.setattr(train, '_train_holding', fail)
  monkeypatch.setattr(main, 'initialize_distributed', lambda: None)

  def run(config):
    workdir = str(tmp_path / 'workdir')
    # verbose=True: the console's default state, no absl log filter left for later tests.
    monkeypatch.setattr(
        main, 'FLAGS', types.SimpleNamespace(config=config, workdir=workdir, verbose=True)
    )
    status = main.main(['convnext-train'])
    return status, capsys.readouterr().err, trained, workdir

  return run


def test_main_config_mistake_exits_2_before_training(run_main):
  status, err, trained, workdir = run_main(_demo(global_batch_size=0))
  assert status == 2 and not trained and not os.path.exists(workdir)
  assert err.splitlines()[-1] == (
      'convnext-train: error: config.global_batch_size must be a positive integer, got 0'
  )


def test_main_mesh_mistake_exits_2_before_training(run_main):
  # The test session has 8 CPU devices (conftest.py): 12 images do not split over them.
  status, err, trained, workdir = run_main(_demo(global_batch_size=12))
  assert status == 2 and not trained and not os.path.exists(workdir)
  assert err.splitlines()[-1] == (
      'convnext-train: error: micro-batch 12 (global_batch_size / grad_accum_steps) is not '
      "divisible by the data-parallel size 8 (mesh {'data': 8, 'fsdp': 1, 'model': 1}); "
      'change global_batch_size or config.mesh'
  )


def test_main_run_error_exits_1_with_one_line(run_main):
  status, err, trained, workdir = run_main(_demo())
  assert status == 1 and trained == [workdir]
  assert err.splitlines()[-1] == (
      f'convnext-train: error: loss is not finite at step 3 in {workdir}; lower optim.lr'
  )


# ---------------------------------------------------------------------------------------
# The command line: what `validation.command_line` finds before absl parses the flags, in
# process; then `python -m convnext_jax.main` in subprocesses, one case per stage that can
# refuse a command (before absl, absl itself, the config loader, the trainer's checks).

DEMO = 'configs/demo.py:runlocal'
# The shipped configs' names, as listed in the repository (not by the loader under test).
SHIPPED = ', '.join(sorted(p.stem for p in (REPO / 'configs').glob('[!_]*.py')))
COMMAND_LINE_CASES = {
    'unknown_nested_key': (
        [f'--config={DEMO}', '--config.optim.lrr=1'],
        'config.optim.lrr is not a config key; did you mean config.optim.lr?',
    ),
    'free_form_key': (
        [f'--config={DEMO}', '--config.model.overrides.depths=(1,1,1,1)'],
        'config.model.overrides.depths cannot be added on its own; set the whole dict, e.g. '
        '--config.model.overrides="{\'depths\': ...}"',
    ),
    'missing_config_file': (
        ['--config=configs/nope.py:runlocal'],
        f'config configs/nope.py not found: it is not a file, nor a config shipped in '
        f'{REPO / "configs"}; give a config file or one of: {SHIPPED}',
    ),
    'get_config_raises': (
        ['--config=configs/convnext_t_in22k_ft_in1k.py', '--config.seed=1'],
        'config configs/convnext_t_in22k_ft_in1k.py: fine-tuning needs pre-trained '
        'weights: append :init=PATH to the config (a training workdir or a `convnext-convert '
        'import` directory)',
    ),
}


@pytest.mark.parametrize('case', list(COMMAND_LINE_CASES))
def test_command_line_mistake_is_one_line(case, monkeypatch):
  args, message = COMMAND_LINE_CASES[case]
  monkeypatch.chdir(REPO)  # Config paths as a user in the checkout gives them.
  with pytest.raises(validation.ConfigError) as e:
    validation.command_line(['convnext-train', *args, '--workdir=/tmp/unused'], main.USAGE)
  assert str(e.value) == message


# The rules behind the trainer's checks are test_check_refuses_with_one_line's, and main's
# exit status for them test_main_config_mistake_exits_2_before_training's.
CLI_CASES = {
    'unknown_key': (
        [f'--config={DEMO}', '--config.learning_rate=1'],
        'config.learning_rate is not a config key; did you mean config.optim.lr?',
    ),
    'wrong_type': (
        [f'--config={DEMO}', '--config.global_batch_size=abc'],
        "config.global_batch_size must be an integer, got 'abc'",
    ),
    'misspelt_config_name': (
        ['--config=dmeo:runlocal'],
        f'config dmeo not found: it is not a file, nor a config shipped in {REPO / "configs"}; '
        f'did you mean demo? give a config file or one of: {SHIPPED}',
    ),
    'no_workdir': (
        ['--config=demo:runlocal'],
        '--workdir is required: python -m convnext_jax.main --config NAME_OR_FILE[:args] '
        '--workdir DIR',
    ),
    'mesh_larger_than_devices': (
        [f'--config={DEMO}', '--config.mesh=3,1,1'],
        "mesh {'data': 3, 'fsdp': 1, 'model': 1} has 3 devices but 1 are available; set "
        'config.mesh to multiply to 1',
    ),
}


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory):
  """Every CLI case run once, two processes at a time: {case: (workdir, CompletedProcess)}."""
  root = tmp_path_factory.mktemp('cli')
  env = multiprocess.cpu_env(TF_CPP_MIN_LOG_LEVEL='3')

  def run(case):
    workdir = root / case
    command = [sys.executable, '-m', 'convnext_jax.main', *CLI_CASES[case][0]]
    if case != 'no_workdir':
      command.append(f'--workdir={workdir}')
    return workdir, subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False
    )

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(zip(CLI_CASES, pool.map(run, CLI_CASES)))


@pytest.mark.parametrize('case', list(CLI_CASES))
def test_cli_mistake_is_one_line_exit_2_and_no_workdir(cli_results, case):
  workdir, result = cli_results[case]
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1] == f'convnext-train: error: {CLI_CASES[case][1]}'
  assert 'Traceback' not in result.stderr and '] config:' not in result.stderr
  assert len(result.stderr.splitlines()) < 12, result.stderr  # No dataset list, no usage.
  assert result.stdout == ''
  assert not workdir.exists()
