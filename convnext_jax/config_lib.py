"""The base training config and the recipe builders the files in `configs/` call.

Durations are given in epochs here and turned into steps in one place
(`run.schedule`), from the dataset size and the global batch. Every config accepts
an argument string after the file name, e.g. `--config configs/convnext_t_in1k.py:runlocal`:
  runlocal   shrink anything to a CPU smoke run (tiny batch, few steps, small images, the
             built-in dataset unless the config already uses a local one);
  res=384    the training/evaluation resolution (fine-tuning configs).
"""

from typing import Any

import ml_collections

from convnext_jax.data import IMAGENET_MEAN_FILL

# `model.dtype`: the compute dtypes (parameters and optimizer state stay float32).
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')


def parse_arg(arg: str | None) -> dict[str, str]:
  """'runlocal,res=384' -> {'runlocal': '', 'res': '384'}."""
  out = {}
  for part in (arg or '').split(','):
    part = part.strip()
    if part:
      key, _, value = part.partition('=')
      out[key] = value
  return out


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.model.overrides` as `models.create_model` arguments (lists made tuples)."""
  return {
      k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.overrides.items()
  }


def base() -> ml_collections.ConfigDict:
  """Shared defaults: the official ImageNet-1K from-scratch recipe at 224."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'convnext_tiny'
  c.model.num_classes = -1  # -1: the dataset's class count.
  c.model.drop_path_rate = 0.1
  c.model.layer_scale_init_value = -1.0  # -1: the variant's default.
  c.model.head_init_scale = 1.0
  c.model.dtype = 'bfloat16'  # Compute dtype; parameters and optimizer state stay float32.
  # Rematerialisation policy (models.remat_policy): '' off, 'full', 'dots_saveable', ...
  # The field takes any type so that old configs' True/False (True is 'full') still load.
  c.model.remat = ml_collections.FieldReference('', field_type=object)
  c.model.scan = False  # One lax.scan per stage: fast compiles at depth, same params.
  # Other create_model arguments, e.g. depths=(2, 2, 6, 2), dims=(...) for a custom size.
  c.model.overrides = ml_collections.ConfigDict()
  # Models with BatchNorm (roadmap steps up to 'fewer_norm'): examples per statistics group
  # in training. 0: the per-device micro-batch (global_batch_size / grad_accum_steps / the
  # data-parallel size), as PyTorch DDP without SyncBN, which the paper ran; -1: the whole
  # micro-batch (SyncBN); N > 0: N examples, dividing the micro-batch. Other models ignore it.
  c.model.bn_group_size = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'imagenet2012'
  c.dataset.data_dir = ''  # '' : tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.label_key = 'label'
  # Builder arguments, e.g. root='/data/flowers' for class_folder.
  c.dataset.builder_kwargs = ml_collections.ConfigDict()
  # Extra evaluation sets: 'name:split:label_key' strings, e.g. 'imagenet_v2:test:label'.
  c.dataset.extra_eval = ()

  c.input = ml_collections.ConfigDict()
  c.input.image_size = 224
  c.input.eval_image_size = -1  # -1: image_size.
  # Evaluation: resize to int(size / crop_pct), the shorter side ('center') or both
  # ('squash'), then the centre crop. Defaults: the official 'center' 0.875 below 384 px,
  # 'squash' 1.0 from 384.
  c.input.crop_pct = -1.0  # -1: 0.875 below 384 px, 1.0 from 384.
  c.input.crop_mode = ''  # '': 'center' below 384 px, 'squash' from 384.
  c.input.scale = (0.08, 1.0)
  c.input.ratio = (3 / 4, 4 / 3)
  c.input.hflip = 0.5
  c.input.randaugment = 'rand-m9-mstd0.5-inc1'
  c.input.fill = IMAGENET_MEAN_FILL
  c.input.random_erasing = 0.25
  c.input.mixup_alpha = 0.8
  c.input.cutmix_alpha = 1.0
  c.input.mixup_prob = 1.0
  c.input.mixup_switch_prob = 0.5
  c.input.label_smoothing = 0.1
  c.input.shuffle_buffer = 10_000
  c.input.threads = 0  # tf.data thread pool size; 0: TensorFlow's default.

  c.global_batch_size = 4096
  c.grad_accum_steps = 1
  c.num_epochs = 300.0
  c.num_steps = -1  # > 0 overrides num_epochs.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 4e-3  # Absolute, at global_batch_size (the official code does not rescale).
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 20.0
  c.optim.warmup_steps = -1  # >= 0 overrides warmup_epochs.
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.layer_decay = 1.0
  c.optim.layer_decay_scheme = 'group'
  c.optim.grad_clip_norm = 0.0

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.9999  # 0 disables the EMA.
  c.ema.warmup = False

  c.mesh = (-1, 1, 1)  # (data, fsdp, model); -1 takes the remaining devices.
  c.sharding_min_size = 2**14

  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.eval_every_steps = -1  # > 0 overrides eval_every_epochs.
  c.eval_batch_size = -1  # -1: global_batch_size (rounded to the data-parallel size).
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_best_checkpoint = True
  # A step whose loss, gradient norm or new parameters are not finite leaves the state as it
  # was; 'skip' goes on (stopping after max_consecutive such steps in a row), 'stop' stops at
  # the first. Either way no checkpoint ever holds non-finite weights.
  c.nonfinite = ml_collections.ConfigDict()
  c.nonfinite.action = 'skip'  # 'skip' or 'stop'.
  c.nonfinite.max_consecutive = 10
  c.profile_start_step = -1  # >= 0: trace profile_num_steps steps from here.
  c.profile_num_steps = 5

  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ''  # A `convnext-convert import` checkpoint or a training workdir.
  c.init_from.params = 'ema'  # 'ema' or 'raw' (workdirs); converted ones hold one set.
  c.init_from.step = -1  # -1: latest (workdirs).
  c.init_from.strict = True  # Besides a re-initialised head, names and shapes must match.
  return c


def shapes_on_cpu(c: ml_collections.ConfigDict, image_size: int) -> None:
  """In place: a few minutes' training on the built-in `convnext_shapes` (5000 images) on a
  CPU, as configs/demo.py and the roadmap's mini preset train: float32, no stochastic depth,
  batch 64, AdamW lr 3e-3 with one warmup epoch, crops of 50-100% of the image; RandAugment,
  Random Erasing and Mixup/CutMix off (they do not pay in a few epochs of 5000 images)."""
  c.model.drop_path_rate = 0.0
  c.model.dtype = 'float32'
  c.dataset.name = 'convnext_shapes'
  c.input.image_size = image_size
  c.input.scale = (0.5, 1.0)
  c.input.randaugment = ''
  c.input.random_erasing = 0.0
  c.input.mixup_alpha = 0.0
  c.input.cutmix_alpha = 0.0
  c.input.shuffle_buffer = 5000
  c.global_batch_size = 64
  c.optim.lr = 3e-3
  c.optim.warmup_epochs = 1.0


def runlocal(c: ml_collections.ConfigDict, local_dataset: bool = True) -> None:
  """Shrinks `c` in place for a CPU smoke run."""
  no_root = c.dataset.name == 'class_folder' and not c.dataset.builder_kwargs.get('root')
  if local_dataset and (c.dataset.name in ('imagenet2012', 'imagenet22k') or no_root):
    c.dataset.name = 'convnext_shapes'
    c.dataset.eval_split = 'validation'
    c.dataset.builder_kwargs = ml_collections.ConfigDict()
    c.dataset.extra_eval = ()
  c.model.dtype = 'float32'
  c.input.image_size = 64
  c.input.eval_image_size = -1
  c.input.shuffle_buffer = 512
  c.global_batch_size = 16
  c.grad_accum_steps = 1
  c.num_steps = 6
  c.optim.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 6
  c.eval_batch_size = 64
  c.checkpoint_every_steps = 6
  c.init_from.path = ''  # A smoke run has no pre-trained weights to start from.


def finalize(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the shared arguments (`runlocal`) and returns `c`."""
  if 'runlocal' in parse_arg(arg):
    runlocal(c)
  return c


def in1k(model: str, drop_path_rate: float, arg: str | None = None, warmup_epochs: float = 20.0):
  """ImageNet-1K from scratch at 224 (300 epochs, EMA): the paper's table."""
  c = base()
  c.model.name = model
  c.model.drop_path_rate = drop_path_rate
  c.optim.warmup_epochs = warmup_epochs
  return finalize(c, arg)


def in22k(model: str, drop_path_rate: float, arg: str | None = None):
  """ImageNet-22K pre-training at 224: 90 epochs, 5 warmup, no EMA, 21841 classes."""
  c = base()
  c.model.name = model
  c.model.drop_path_rate = drop_path_rate
  c.dataset.name = 'imagenet22k'
  c.num_epochs = 90.0
  c.optim.warmup_epochs = 5.0
  c.ema.decay = 0.0
  return finalize(c, arg)


def finetune(
    model: str,
    drop_path_rate: float,
    layer_decay: float,
    arg: str | None = None,
    ema: bool = False,
    default_res: int = 224,
) -> ml_collections.ConfigDict:
  """Fine-tuning on ImageNet-1K: AdamW lr 5e-5 at batch 512, weight decay 1e-8, 30 epochs,
  cosine without warmup, no Mixup/CutMix (label smoothing, RandAugment and Random Erasing
  kept), layer-wise lr decay, a new head at head_init_scale 0.001 when classes differ.

  Arguments: init=PATH (required: a training workdir or converted checkpoint), step=N,
  params=ema|raw, res=224|384.
  """
  c = base()
  finetune_recipe(c, model, drop_path_rate, layer_decay, arg, ema, default_res)
  require_init(c, arg)
  return finalize(c, arg)


def finetune_recipe(
    c: ml_collections.ConfigDict,
    model: str,
    drop_path_rate: float,
    layer_decay: float,
    arg: str | None,
    ema: bool,
    default_res: int,
) -> None:
  """Sets the fine-tuning recipe (see `finetune`) on `c` in place."""
  args = parse_arg(arg)
  c.model.name = model
  c.model.drop_path_rate = drop_path_rate
  c.model.head_init_scale = 0.001
  c.global_batch_size = 512
  c.num_epochs = 30.0
  c.optim.lr = 5e-5
  c.optim.weight_decay = 1e-8
  c.optim.warmup_epochs = 0.0
  c.optim.layer_decay = layer_decay
  c.input.mixup_alpha = 0.0
  c.input.cutmix_alpha = 0.0
  c.ema.decay = 0.9999 if ema else 0.0
  c.init_from.path = args.get('init', '')
  c.init_from.params = args.get('params') or 'ema'
  c.init_from.step = int(args.get('step') or -1)
  c.input.image_size = int(args.get('res') or default_res)


# ConvNeXt-V2 sizes (their FCMAE models are 'fcmae_convnextv2_<size>').
V2_SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base', 'large', 'huge')


def _v2_size(args: dict[str, str], default: str = 'atto') -> str:
  size = args.get('model') or default
  if size not in V2_SIZES:
    raise ValueError(f'model={size}: expected one of {", ".join(V2_SIZES)}')
  return size


def fcmae_pretrain(arg: str | None = None) -> ml_collections.ConfigDict:
  """FCMAE pre-training of a ConvNeXt-V2 on ImageNet-1K, the official recipe (fcmae.md):
  1600 epochs at batch 4096, AdamW betas (0.9, 0.95), weight decay 0.05 (kernels, GRN and
  the mask token), lr 1.5e-4 x batch / 256, 40 warmup epochs, per-step cosine to 0, float32;
  RandomResizedCrop(0.2-1) and flips only; no labels, Mixup, EMA or accuracy (evaluation is
  the masked reconstruction loss on the validation split, with a picture of the
  reconstructions).

  Arguments: model=atto|...|huge (default atto), epochs=N (800 is the paper's ablation length),
  mini (the CPU preset, `fcmae_mini`).
  """
  args = parse_arg(arg)
  c = base()
  c.model.name = f'fcmae_convnextv2_{_v2_size(args)}'
  c.model.drop_path_rate = 0.0
  c.model.dtype = 'float32'
  c.global_batch_size = 4096
  c.num_epochs = float(args.get('epochs') or 1600)
  c.optim.lr = 1.5e-4 * c.global_batch_size / 256
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 40.0
  c.optim.weight_decay = 0.05
  c.optim.b2 = 0.95
  c.input.scale = (0.2, 1.0)
  c.input.randaugment = ''
  c.input.random_erasing = 0.0
  c.input.mixup_alpha = 0.0
  c.input.cutmix_alpha = 0.0
  c.input.label_smoothing = 0.0
  c.ema.decay = 0.0
  c.eval_every_epochs = 20.0
  c.keep_best_checkpoint = False  # The latest pre-trained encoder is the one to fine-tune.
  if 'mini' in args:
    fcmae_mini(c, pretraining=True, epochs=float(args.get('epochs') or FCMAE_MINI_EPOCHS[0]))
  return finalize(c, arg)


# The --mini track's epochs of the built-in dataset: pre-training, then fine-tuning (each of
# the two fine-tuning runs, from the pre-trained encoder and from scratch).
FCMAE_MINI_EPOCHS = (6.0, 10.0)
FCMAE_MINI_SIZES = (96, 64)  # Pre-training: 3x3 cells of 32 px; fine-tuning as fast as fits.


def fcmae_mini(c: ml_collections.ConfigDict, pretraining: bool, epochs: float) -> None:
  """In place: the FCMAE --mini CPU preset on the built-in `convnext_shapes` (5000 images of
  64 px, 10 classes): pre-training at 96 px (3x3 cells, 3 kept), lr 1e-3 at batch 64; the
  fine-tuning runs at 64 px with the demo's recipe (`shapes_on_cpu`, EMA 0.995), the same
  for the pre-trained and the from-scratch run. The recipe's learning rates, scaled to batch
  64 over a few epochs, would barely move the weights; so would its 40 warmup epochs."""
  shapes_on_cpu(c, FCMAE_MINI_SIZES[0] if pretraining else FCMAE_MINI_SIZES[1])
  c.num_epochs = epochs
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.eval_batch_size = 200
  if pretraining:
    c.input.scale = (0.2, 1.0)  # The recipe's crops.
    c.optim.lr = 1e-3
    c.eval_every_epochs = epochs / 3
  else:
    c.optim.layer_decay = 1.0  # As from scratch: the two runs differ by their start only.
    c.ema.decay = 0.995
    c.ema.warmup = True
    c.input.mixup_alpha = c.input.cutmix_alpha = 0.0
    c.input.random_erasing = 0.0
    c.input.label_smoothing = 0.1
    c.eval_every_epochs = epochs / 2


# Fine-tuning after FCMAE, ConvNeXt-V2's TRAINING.md (batch 1024, lr = blr x 1024 / 256):
# size -> (epochs, blr, warmup epochs, layer decay, its scheme, weight decay, drop path,
# mixup, cutmix, label smoothing). Atto, tiny and base are the published rows; the other
# sizes take the nearest one (femto, pico, nano: atto's; small: tiny's; large, huge: base's).
_FCMAE_FINETUNE = {
    'atto': (600, 2e-4, 0, 0.9, 'single', 0.3, 0.1, 0.0, 0.0, 0.2),
    'tiny': (300, 8e-4, 40, 0.9, 'single', 0.05, 0.2, 0.8, 1.0, 0.1),
    'base': (100, 6.25e-4, 20, 0.6, 'group', 0.05, 0.1, 0.8, 1.0, 0.1),
}
_FCMAE_FINETUNE_ROW = {
    'atto': 'atto',
    'femto': 'atto',
    'pico': 'atto',
    'nano': 'atto',
    'tiny': 'tiny',
    'small': 'tiny',
    'base': 'base',
    'large': 'base',
    'huge': 'base',
}


def fcmae_finetune(arg: str | None = None) -> ml_collections.ConfigDict:
  """ImageNet-1K fine-tuning of `convnextv2_<size>` from its FCMAE pre-training, the
  official recipe (`_FCMAE_FINETUNE`): RandAugment m9, Random Erasing 0.25, EMA 0.9999
  evaluated, bfloat16, the decoder dropped and a new head (trunc normal std 2e-5 =
  0.02 x head_init_scale 0.001), its final norm fresh.

  Arguments: model=atto|...|huge (default atto), init=PATH (required: an FCMAE training
  workdir, or a converted encoder), step=N, res=224|384; mini (the CPU preset,
  `fcmae_mini`), with which scratch (no init: the same run from random weights) may replace
  init.
  """
  args = parse_arg(arg)
  size = _v2_size(args)
  epochs, blr, warmup, layer_decay, scheme, wd, drop_path, mixup, cutmix, smoothing = (
      _FCMAE_FINETUNE[_FCMAE_FINETUNE_ROW[size]]
  )
  c = base()
  c.model.name = f'convnextv2_{size}'
  c.model.drop_path_rate = drop_path
  c.model.head_init_scale = 0.001
  c.global_batch_size = 1024
  c.num_epochs = float(epochs)
  c.optim.lr = blr * c.global_batch_size / 256
  c.optim.warmup_epochs = float(warmup)
  c.optim.layer_decay = layer_decay
  c.optim.layer_decay_scheme = scheme
  c.optim.weight_decay = wd
  c.input.mixup_alpha = mixup
  c.input.cutmix_alpha = cutmix
  c.input.label_smoothing = smoothing
  c.input.image_size = int(args.get('res') or 224)
  c.init_from.path = args.get('init', '')
  c.init_from.params = 'raw'  # Pre-training keeps no EMA.
  c.init_from.step = int(args.get('step') or -1)
  if 'mini' in args:
    fcmae_mini(c, pretraining=False, epochs=float(args.get('epochs') or FCMAE_MINI_EPOCHS[1]))
  if 'scratch' in args:
    if 'mini' not in args or c.init_from.path:
      raise ValueError('scratch goes with mini and without init= (the --mini track baseline)')
  else:
    require_init(c, arg)
  return finalize(c, arg)


def require_init(c: ml_collections.ConfigDict, arg: str | None) -> None:
  """Raises ValueError when a fine-tuning config has no weights to start from."""
  if not c.init_from.path and 'runlocal' not in parse_arg(arg):
    raise ValueError(
        'fine-tuning needs pre-trained weights: append :init=PATH to the config '
        '(a training workdir or a `convnext-convert import` directory)'
    )
