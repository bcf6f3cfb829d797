"""Config validation, every rule in one place: `check(config, mesh)` raises `ConfigError`, one
line, before anything heavy runs.

`run.Run.build` calls it (the trainer calls it first, before it prepares the dataset or
creates the workdir, and hands its result on). Without a mesh it checks what needs no device:
names, types, ranges and combinations of keys; with the mesh, also that the batch splits over
it (micro-batches, per-device batches for Mixup and BatchNorm statistics) and that the
processes can feed it. Every message names the key, the value and what would be accepted,
e.g. `config.global_batch_size must be a positive integer, got 0`.

Keys are those of `config_lib.base()`. `model.overrides` holds arguments of
`models.create_model`: checked against the model's attributes. `dataset.builder_kwargs` holds
the dataset builder's arguments: passed on unchecked. Nothing here imports TensorFlow.

The command line's mistakes are this module's too (`command_line`): a config file that
cannot be found or loaded, an override of a key the config lacks (checked here, before absl
parses the flags) and the few absl flag errors that remain, translated by one table.
"""

import difflib
import math
import re

from absl import flags
from etils import epath
import jax
import ml_collections
import tensorflow_datasets as tfds

from convnext_jax import config_lib
from convnext_jax import configs
from convnext_jax import datasets  # Registers the project's builders with tfds.
from convnext_jax import models
from convnext_jax import optim
from convnext_jax import sharding
from convnext_jax.data import CROP_MODES
from convnext_jax.data import randaugment_spec
from convnext_jax.models import fcmae

# Sub-dicts whose keys are arguments passed on, not config keys.
FREE_FORM = ('model.overrides', 'dataset.builder_kwargs')

# Names other training code uses for these keys: no spelling is close enough for difflib.
_ALIASES = {
    'learning_rate': 'optim.lr',
    'batch_size': 'global_batch_size',
    'epochs': 'num_epochs',
    'steps': 'num_steps',
}

NONFINITE_ACTIONS = ('skip', 'stop')
INIT_PARAMS = ('ema', 'raw')


class ConfigError(ValueError):
  """A config value the run cannot use; the message is one line naming the key."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every dotted key of `config`, sub-dicts included, not descending into `FREE_FORM`."""
  keys = []
  for name, value in config.items():
    key = prefix + name
    keys.append(key)
    if isinstance(value, ml_collections.ConfigDict) and key not in FREE_FORM:
      keys.extend(flat_keys(value, key + '.'))
  return keys


def close_key(key: str, known: list[str]) -> str | None:
  """The known key a mistyped `key` most likely means, or None."""
  leaf = key.rsplit('.', 1)[-1]
  if _ALIASES.get(leaf) in known:
    return _ALIASES[leaf]
  same_leaf = [k for k in known if k.rsplit('.', 1)[-1] == leaf]
  if same_leaf:  # The right name at the wrong level, e.g. `weight_decay` for optim's.
    return same_leaf[0]
  matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  return matches[0] if matches else None


def unknown_key_error(key: str, config: ml_collections.ConfigDict) -> ConfigError:
  """The error for `config.<key>`, which `config` does not have."""
  for free in FREE_FORM:
    if key.startswith(free + '.'):
      # A locked config takes no new keys, but the whole dict can be replaced at once.
      sub = key[len(free) + 1 :]
      return ConfigError(
          f'config.{key} cannot be added on its own; set the whole dict, e.g. '
          f'--config.{free}="{{\'{sub}\': ...}}"'
      )
  guess = close_key(key, flat_keys(config))
  hint = (
      f'; did you mean config.{guess}?' if guess else ('; the keys are those of config_lib.base()')
  )
  return ConfigError(f'config.{key} is not a config key{hint}')


def check(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> sharding.BatchFeed | None:
  """Checks `config`; with `mesh`, also that its batches split over the mesh and that the
  processes can feed it.

  Args:
    config: a training config (built on `config_lib.base()`).
    mesh: the run's device mesh (`config_mesh`), once every device is visible (after
      `jax.distributed.initialize`, if any).

  Returns:
    With a mesh, this process's `sharding.BatchFeed`: which rows of each batch it feeds.

  Raises:
    ConfigError: the first mistake, as one line.
  """
  known = flat_keys(config_lib.base())
  keys = flat_keys(config)
  for key in keys:
    if key not in known and not any(key.startswith(f + '.') for f in FREE_FORM):
      raise unknown_key_error(key, config_lib.base())
  for key in known:
    if key not in keys:
      raise ConfigError(
          f'config.{key} is missing; build configs on config_lib.base(), which sets every key'
      )
  c = config
  _integer(c, 'seed', None)

  _model(c)
  _dataset(c)
  _input(c)
  if models.get_spec(c.model.name).masked_autoencoder:
    _masked_autoencoder(c)

  _integer(c, 'global_batch_size', 1)
  _integer(c, 'grad_accum_steps', 1)
  if c.global_batch_size % c.grad_accum_steps:
    raise ConfigError(
        f'config.global_batch_size {c.global_batch_size} is not divisible by '
        f'config.grad_accum_steps {c.grad_accum_steps}'
    )
  _steps_or_epochs(c, 'num_steps', 1, 'to train for num_epochs', 'num_epochs', '> 0')

  _number(c, 'optim.lr', '>= 0 (0: the weights stay as they are)', lambda v: v >= 0)
  _number(c, 'optim.min_lr', '>= 0', lambda v: v >= 0)
  _steps_or_epochs(
      c, 'optim.warmup_steps', 0, 'to use optim.warmup_epochs', 'optim.warmup_epochs', '>= 0'
  )
  _number(c, 'optim.weight_decay', '>= 0', lambda v: v >= 0)
  _number(c, 'optim.b1', 'in [0, 1)', lambda v: 0 <= v < 1)
  _number(c, 'optim.b2', 'in [0, 1)', lambda v: 0 <= v < 1)
  _number(c, 'optim.eps', '>= 0', lambda v: v >= 0)
  _number(c, 'optim.layer_decay', 'in (0, 1]', lambda v: 0 < v <= 1)
  _choice(c, 'optim.layer_decay_scheme', optim.LAYER_DECAY_SCHEMES)
  _number(c, 'optim.grad_clip_norm', '>= 0 (0: no clipping)', lambda v: v >= 0)

  _number(c, 'ema.decay', 'in [0, 1) (0: no EMA)', lambda v: 0 <= v < 1)
  _boolean(c, 'ema.warmup')

  _mesh(c)
  _integer(c, 'sharding_min_size', 0)

  _integer(c, 'log_every_steps', 1)
  _steps_or_epochs(c, 'eval_every_steps', 1, 'to use eval_every_epochs', 'eval_every_epochs', '> 0')
  _integer(c, 'eval_batch_size', 1, sentinel='for global_batch_size')
  _integer(c, 'checkpoint_every_steps', 1)
  _integer(c, 'keep_checkpoints', 1)
  _boolean(c, 'keep_best_checkpoint')
  _choice(c, 'nonfinite.action', NONFINITE_ACTIONS)
  _integer(c, 'nonfinite.max_consecutive', 1)
  _integer(c, 'profile_start_step', 0, sentinel='for no profile')
  _integer(c, 'profile_num_steps', 1)

  _init_from(c)
  if mesh is None:
    return None
  return _batch_splits(c, mesh)


def config_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """`sharding.make_mesh(config.mesh, devices)`, a mesh the devices cannot form refused as
  one line.

  Raises:
    ConfigError: `config.mesh` is not a mesh shape, or its sizes do not fit the devices.
  """
  _mesh(config)
  try:
    return sharding.make_mesh(config.mesh, devices)
  except ValueError as e:  # make_mesh's messages are one line and name config.mesh.
    raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------
# The command line.


def config_argument(argv: list[str]) -> tuple[int, str] | None:
  """(index in `argv`, value) of the --config flag's value ('name_or_file[:args]'), or None."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(r'--?config(=(.*))?', arg)
    if match:
      if match.group(1):
        return i, match.group(2)
      return (i + 1, argv[i + 1]) if i + 1 < len(argv) else None
  return None


def command_line(argv: list[str], usage: str) -> list[str]:
  """Checks what absl would report badly, before it parses `argv`: the config argument
  names a config that loads (`configs.load`), and every `--config.<key>` override is a key
  of it. Returns `argv` with the config argument as the file absl's config flag reads (a
  shipped config's name resolved to its file).

  Raises:
    ConfigError: the first mistake, as one line.
  """
  del usage  # A missing --config is absl's to report (`flag_error`).
  found = config_argument(argv)
  if found is None:
    return argv
  index, argument = found
  try:
    config = configs.load(argument)
  except configs.ConfigFileError as e:  # One line naming the config.
    raise ConfigError(str(e)) from None
  except (TypeError, ValueError, OSError) as e:  # What a get_config raises for its user.
    raise ConfigError(f'config {argument}: {" ".join(str(e).split())}') from None
  known = flat_keys(config)
  for arg in argv:
    match = re.match(r'--?(?:no)?config\.([^=]+)', arg)
    if match and match.group(1) not in known:
      raise unknown_key_error(match.group(1), config)
  argv = list(argv)
  argv[index] = argv[index].replace(argument, configs.resolve(argument))
  return argv


_FLAG_TYPES = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false'}

# absl's flag errors that can remain once `command_line` has passed, by the wording absl gives
# them (tests/test_validation.py checks it against absl): (pattern, message template).
_ABSL_ERRORS = (
    (r'flag --(config\.[^=]+)=(.*?): .*', '{0} must be {type}, got {1!r}'),
    (
        r'(?:flag --\w+=None: )?Flag --(\w+) must have a value other than None\.?',
        '--{0} is required: {usage}',
    ),
)


def flag_error(error, usage: str) -> str:
  """One line for an absl flag error (`flags.Error`): an override value of the wrong type, a
  required flag left out; others as absl words them, on one line.

  Args:
    error: what absl raised.
    usage: the command's usage line.
  """
  text = ' '.join(str(error).split())
  for pattern, template in _ABSL_ERRORS:
    match = re.fullmatch(pattern, text)
    if match:
      name = match.group(1)
      flag_type = flags.FLAGS[name].flag_type() if name in flags.FLAGS else ''
      return template.format(
          *match.groups(), type=_FLAG_TYPES.get(flag_type, f'a valid {flag_type}'), usage=usage
      )
  return text


# ---------------------------------------------------------------------------------------
# Sections.


def _model(c) -> None:
  names = models.list_models()
  if c.model.name not in names:
    raise ConfigError(
        f'config.model.name {c.model.name!r} is not a registered model'
        f'{_did_you_mean(c.model.name, names)}; see models.list_models()'
    )
  _integer(c, 'model.num_classes', 1, sentinel="for the dataset's class count")
  _number(c, 'model.drop_path_rate', 'in [0, 1)', lambda v: 0 <= v < 1)
  _number(
      c,
      'model.layer_scale_init_value',
      '>= 0',
      lambda v: v >= 0,
      sentinel="for the variant's default",
  )
  _number(c, 'model.head_init_scale', '>= 0', lambda v: v >= 0)
  _choice(c, 'model.dtype', config_lib.COMPUTE_DTYPES)
  _remat(c, 'model.remat')
  _boolean(c, 'model.scan')
  if c.model.scan and models.get_spec(c.model.name).roadmap:
    raise ConfigError(
        f'config.model.scan must be False for {c.model.name}: roadmap models '
        'have no scanned form'
    )
  _integer(
      c,
      'model.bn_group_size',
      0,
      sentinel='for the whole micro-batch',
      why='examples per BatchNorm statistics group; 0: the per-device micro-batch',
  )
  _overrides(c)


# Model arguments the config sets with keys of its own: an override would shadow them.
_OVERRIDES_OF_KEYS = {
    'num_classes': 'model.num_classes',
    'drop_path_rate': 'model.drop_path_rate',
    'layer_scale_init_value': 'model.layer_scale_init_value',
    'head_init_scale': 'model.head_init_scale',
    'dtype': 'model.dtype',
    'remat': 'model.remat',
    'scan': 'model.scan',
    'bn_group_size': 'model.bn_group_size',
}


def _overrides(c) -> None:
  """`model.overrides`: arguments of the model's Flax module that no config key sets."""
  overrides = c.model.overrides
  if not isinstance(overrides, (dict, ml_collections.ConfigDict)):
    raise ConfigError(
        f'config.model.overrides must be a dict of model arguments, got {overrides!r}'
    )
  fields = models.module_arguments(c.model.name)
  for key in overrides:
    if key in _OVERRIDES_OF_KEYS:
      raise ConfigError(
          f'config.model.overrides.{key}: set config.{_OVERRIDES_OF_KEYS[key]} instead'
      )
    if key not in fields:
      raise ConfigError(
          f'config.model.overrides.{key} is not an argument of {c.model.name}'
          f'{_did_you_mean(key, fields)}; its arguments are {", ".join(sorted(fields))}'
      )


def _masked_autoencoder(c) -> None:
  """FCMAE pre-training: images of whole 32-px cells, some removed and some kept; no labels
  to mix, no classifier to decay layer by layer."""
  # The masking and decoder arguments, before the model is built from them.
  overrides = c.model.overrides
  if 'mask_ratio' in overrides:
    _number(c, 'model.overrides.mask_ratio', 'in (0, 1) (the recipe: 0.6)', lambda v: 0 < v < 1)
  if 'decoder_depth' in overrides:
    _integer(c, 'model.overrides.decoder_depth', 0)
  if 'decoder_dim' in overrides:
    _integer(c, 'model.overrides.decoder_dim', 1)
  model = models.create_model(c.model.name, **config_lib.model_overrides(c))
  ratio = model.mask_ratio
  for key in ('image_size', 'eval_image_size'):
    size = c.input[key]
    if size > 0 and size % model.patch_size:
      raise ConfigError(
          f'config.input.{key} {size}: {c.model.name} masks {model.patch_size}x'
          f'{model.patch_size}-pixel cells, so the image size must be a multiple of '
          f'{model.patch_size} (e.g. {size // model.patch_size * model.patch_size or 32})'
      )
  cells = (c.input.image_size // model.patch_size) ** 2
  kept = fcmae.num_kept(cells, ratio)
  if not 0 < kept < cells:
    raise ConfigError(
        f'config.model.overrides.mask_ratio {ratio} keeps {kept} of the {cells} cells of a '
        f'{c.input.image_size}-px image; it must keep at least one and remove at least one '
        '(the recipe: 0.6)'
    )
  for key in ('mixup_alpha', 'cutmix_alpha'):
    if c.input[key] > 0:
      raise ConfigError(
          f'config.input.{key} must be 0 for {c.model.name}: pre-training has no labels to mix'
      )
  if c.optim.layer_decay != 1.0:
    raise ConfigError(
        f'config.optim.layer_decay must be 1.0 for {c.model.name}: layer-wise decay is a '
        'fine-tuning setting'
    )


def _has_batchnorm(c) -> bool:
  return models.get_spec(c.model.name).with_overrides(**c.model.overrides).uses_batchnorm


def _dataset(c) -> None:
  _dataset_name('config.dataset.name', c.dataset.name)
  _string(c, 'dataset.data_dir', empty_ok=True)
  for key in ('train_split', 'eval_split', 'label_key'):
    _string(c, f'dataset.{key}')
  for key in ('train_split', 'eval_split'):
    _split(f'config.dataset.{key}', c.dataset[key])
  extra = c.dataset.extra_eval
  if not isinstance(extra, (tuple, list)):
    raise ConfigError(
        f"config.dataset.extra_eval must be a tuple of 'name:split[:label_key]' "
        f'strings, got {extra!r}'
    )
  for entry in extra:
    parts = entry.split(':') if isinstance(entry, str) else []
    if not 2 <= len(parts) <= 3 or not all(parts):
      raise ConfigError(
          f"config.dataset.extra_eval entries must be 'name:split[:label_key]', "
          f"e.g. 'imagenet_v2:test:label', got {entry!r}"
      )
    _dataset_name('config.dataset.extra_eval', parts[0])
    _split('config.dataset.extra_eval', parts[1])


def _split(key: str, split: str) -> None:
  """A tfds split: a name, a slice of one or a sum of them ('train', 'validation[:64]',
  'train[:10%]+validation'). Whether the dataset has it is known once it is prepared."""
  try:
    tfds.core.ReadInstruction.from_spec(split)
  except ValueError:
    raise ConfigError(
        f"{key} {split!r} is not a tfds split: a name, a slice such as 'validation[:64]' or "
        "'train[:10%]', or a sum of them joined by '+'"
    ) from None


def _dataset_name(key: str, name) -> None:
  """A tfds dataset: registered with tfds, or one of the project's (`datasets.DATASETS`)."""
  if not isinstance(name, str) or not name:
    raise ConfigError(f'{key} must be a tfds dataset name, got {name!r}')
  try:
    dataset_name = tfds.core.naming.parse_builder_name_kwargs(name)[0]
  except ValueError:
    raise ConfigError(
        f"{key} {name!r} is not a tfds dataset name ('name[/config][:version]')"
    ) from None
  if dataset_name.namespace:  # A community dataset: resolved by tfds, online.
    return
  try:
    tfds.builder_cls(dataset_name.name)
  except tfds.core.registered.DatasetNotFoundError:
    # Not the tfds error itself: it lists every one of several hundred datasets.
    known = sorted(set(tfds.list_builders(with_community_datasets=False)) | set(datasets.DATASETS))
    raise ConfigError(
        f'{key} {dataset_name.name!r} is not a tfds dataset'
        f'{_did_you_mean(dataset_name.name, known)}; this project builds '
        f'{", ".join(datasets.DATASETS)} (README "Datasets")'
    ) from None


def _input(c) -> None:
  spec = models.get_spec(c.model.name)
  if spec.isotropic:
    patch = c.model.overrides.get('patch_size', 16)
    smallest, why = patch, f'{c.model.name} cuts it into {patch}x{patch} patches'
  else:
    smallest, why = 32, (
        f"{c.model.name}'s stem and 3 downsamples divide it by 32; smaller "
        'leaves an empty feature map'
    )
  _integer(c, 'input.image_size', smallest, why=why)
  _integer(c, 'input.eval_image_size', smallest, sentinel='for input.image_size', why=why)
  _number(
      c,
      'input.crop_pct',
      'in (0, 1]',
      lambda v: 0 < v <= 1,
      sentinel='for 0.875 below 384 px, 1.0 from 384',
  )
  if c.input.crop_mode:  # '': 'center' below 384 px, 'squash' from 384.
    _choice(c, 'input.crop_mode', CROP_MODES)
  _pair(c, 'input.scale', '0 < min <= max <= 1', lambda a, b: 0 < a <= b <= 1)
  _pair(c, 'input.ratio', '0 < min <= max', lambda a, b: 0 < a <= b)
  _number(c, 'input.hflip', 'a probability in [0, 1]', lambda v: 0 <= v <= 1)
  if c.input.randaugment:
    try:
      randaugment_spec.RandAugmentConfig.parse(c.input.randaugment)
    except ValueError as e:
      raise ConfigError(f"config.input.randaugment: {str(e).rstrip('.')}; or '' for none") from None
  fill = c.input.fill
  if not (
      isinstance(fill, (tuple, list))
      and len(fill) == 3
      and all(_is_number(v) and 0 <= v <= 255 for v in fill)
  ):
    raise ConfigError(
        f'config.input.fill must be an RGB colour, 3 numbers in [0, 255], got {fill!r}'
    )
  for key in ('random_erasing', 'mixup_prob', 'mixup_switch_prob'):
    _number(c, f'input.{key}', 'a probability in [0, 1]', lambda v: 0 <= v <= 1)
  for key in ('mixup_alpha', 'cutmix_alpha'):
    _number(c, f'input.{key}', '>= 0 (0: off)', lambda v: v >= 0)
  _number(c, 'input.label_smoothing', 'in [0, 1)', lambda v: 0 <= v < 1)
  _integer(c, 'input.shuffle_buffer', 1)
  _integer(c, 'input.threads', 0, why="0: TensorFlow's default")


def _mesh(c) -> None:
  mesh = c.mesh
  ok = (
      isinstance(mesh, (tuple, list))
      and len(mesh) == len(sharding.AXES)
      and all(_is_int(s) and (s >= 1 or s == -1) for s in mesh)
      and list(mesh).count(-1) <= 1
  )
  if not ok:
    raise ConfigError(
        f'config.mesh must be 3 integers for {sharding.AXES}, each >= 1 or one -1 for the '
        f'remaining devices, got {mesh!r}; e.g. --config.mesh=-1,1,1'
    )


def _init_from(c) -> None:
  _string(c, 'init_from.path', empty_ok=True)
  path = c.init_from.path
  if path.endswith(('.pt', '.pth', '.bin', '.safetensors')):
    raise ConfigError(
        f'config.init_from.path {path} is a PyTorch file; convert it first '
        f'(convnext-convert import {path} DIR) and give DIR'
    )
  if path and not epath.Path(path).exists():
    raise ConfigError(
        f'config.init_from.path {path} does not exist; give a training workdir '
        "or a `convnext-convert import` directory, or '' to start from scratch"
    )
  _choice(c, 'init_from.params', INIT_PARAMS)
  _integer(c, 'init_from.step', 0, sentinel='for the latest')
  _boolean(c, 'init_from.strict')


def _batch_splits(c, mesh: jax.sharding.Mesh) -> sharding.BatchFeed:
  """The mesh-dependent rules: the batch splits over the data-parallel devices (and into
  pairs for Mixup, into groups for BatchNorm), and the processes can feed the mesh."""
  dp = sharding.data_parallel_size(mesh)
  micro = c.global_batch_size // c.grad_accum_steps
  if micro % dp:
    raise ConfigError(
        f'micro-batch {micro} (global_batch_size / grad_accum_steps) is not '
        f'divisible by the data-parallel size {dp} (mesh {dict(mesh.shape)}); '
        'change global_batch_size or config.mesh'
    )
  try:
    feed = sharding.batch_feed(mesh)
  except ValueError as e:  # One line naming config.mesh and every process's rows.
    raise ConfigError(str(e)) from None
  cin = c.input
  if (cin.mixup_alpha > 0 or cin.cutmix_alpha > 0) and (micro // dp) % 2:
    # As timm's Mixup, which asserts it: image i is mixed with image B - 1 - i of its batch,
    # so in an odd batch the middle one is mixed with itself.
    raise ConfigError(
        f'Mixup/CutMix needs an even per-device batch, got {micro // dp} '
        f'(micro-batch {micro} over data-parallel size {dp}); change '
        'global_batch_size or grad_accum_steps, or set input.mixup_alpha and '
        'input.cutmix_alpha to 0'
    )
  group = c.model.bn_group_size
  if group > 0 and micro % group and _has_batchnorm(c):
    raise ConfigError(
        f'config.model.bn_group_size {group} does not divide the micro-batch '
        f'{micro} (global_batch_size / grad_accum_steps); set a divisor, 0 for '
        f'the per-device batch ({micro // dp}) or -1 for the whole micro-batch'
    )
  return feed


# ---------------------------------------------------------------------------------------
# One key each.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and not math.isnan(v)


def _value(c, key: str):
  for part in key.split('.'):
    c = c[part]
  return c


def _sentinel_text(sentinel: str | None) -> str:
  return f', or -1 {sentinel}' if sentinel else ''


def _integer(
    c, key: str, low: int | None, *, sentinel: str | None = None, why: str | None = None
) -> None:
  """An int >= `low` (None: any), or -1 when `sentinel` says what -1 means."""
  v = _value(c, key)
  if _is_int(v) and (low is None or v >= low or (sentinel and v == -1)):
    return
  expected = {None: 'an integer', 0: 'an integer >= 0', 1: 'a positive integer'}.get(
      low, f'an integer >= {low}'
  )
  if why:
    expected += f' ({why})'
  raise ConfigError(f'config.{key} must be {expected}{_sentinel_text(sentinel)}, got {v!r}')


def _steps_or_epochs(c, steps: str, low: int, sentinel: str, epochs: str, bound: str) -> None:
  """A duration in steps (an int >= `low`), or -1 and one in epochs (`bound` 0: '> 0' or
  '>= 0'), which `run.schedule` turns into steps."""
  _integer(c, steps, low, sentinel=sentinel)
  if _value(c, steps) == -1:
    ok = (lambda v: v > 0) if bound == '> 0' else (lambda v: v >= 0)
    _number(c, epochs, bound, ok)


def _number(c, key: str, expected: str, ok, *, sentinel: str | None = None) -> None:
  """A number (int or float) for which `ok` holds, or -1 when `sentinel` says what it means."""
  v = _value(c, key)
  if _is_number(v) and (ok(v) or (sentinel and v == -1)):
    return
  if not expected.startswith('a '):
    expected = f'a number {expected}'
  raise ConfigError(f'config.{key} must be {expected}{_sentinel_text(sentinel)}, got {v!r}')


def _pair(c, key: str, expected: str, ok) -> None:
  v = _value(c, key)
  if not (
      isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v) and ok(*v)
  ):
    raise ConfigError(f'config.{key} must be 2 numbers (min, max), {expected}, got {v!r}')


def _choice(c, key: str, choices: tuple[str, ...]) -> None:
  v = _value(c, key)
  if v not in choices:
    hint = _did_you_mean(v, choices) if isinstance(v, str) else ''
    raise ConfigError(
        f'config.{key} must be one of {", ".join(map(repr, choices))}, got {v!r}{hint}'
    )


def _boolean(c, key: str) -> None:
  v = _value(c, key)
  if not isinstance(v, bool):
    raise ConfigError(f'config.{key} must be True or False, got {v!r}')


def _remat(c, key: str) -> None:
  v = _value(c, key)
  try:
    models.remat_policy(v)
    return
  except ValueError:
    pass
  hint = _did_you_mean(v, models.REMAT_POLICIES) if isinstance(v, str) else ''
  raise ConfigError(
      f"config.{key} must be '' (off), True/False or one of "
      f'{", ".join(models.REMAT_POLICIES)}, got {v!r}{hint}'
  )


def _string(c, key: str, empty_ok: bool = False) -> None:
  v = _value(c, key)
  if not isinstance(v, str) or not (v or empty_ok):
    raise ConfigError(f'config.{key} must be a{"" if empty_ok else " non-empty"} string, got {v!r}')


def _did_you_mean(name: str, known) -> str:
  matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f' (did you mean {matches[0]!r}?)' if matches else ''
