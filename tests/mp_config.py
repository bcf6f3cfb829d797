"""A tiny training config for the tests that train end to end: a 1-1-2-1 ConvNeXt at 32 px on
the built-in `convnext_shapes`, 6 steps of 16 images, no RandAugment, no Mixup/CutMix (whose
pairs depend on the device count). `python tests/mp_worker.py --config tests/mp_config.py`
reads it as a config file, with `--config.dataset.data_dir=...`."""

from convnext_jax import config_lib


def tiny(data_dir: str = '', num_steps: int = 6):
  c = config_lib.base()
  config_lib.runlocal(c)
  c.dataset.data_dir = data_dir
  c.model.name = 'convnext_atto'
  c.model.overrides.depths = (1, 1, 2, 1)
  c.model.overrides.dims = (16, 32, 64, 128)
  c.model.overrides.depthwise_impl = 'conv'
  c.input.image_size = 32
  # No RandAugment: its graph takes each run ~1.6 s of CPU to build. The per-example seeds
  # that feed it feed the crop and flip too; that the config's RandAugment reaches the
  # training stream is test_pipeline's, the ops themselves test_randaugment's.
  c.input.randaugment = ''
  c.input.mixup_alpha = 0.0
  c.input.cutmix_alpha = 0.0
  c.num_steps = num_steps
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.eval_batch_size = 200
  return c


def get_config(arg=None):
  """The multi-process tests' config: `tiny()` evaluated on the first 64 validation images,
  logging every step, sharding even small tensors over 'fsdp'. `:folder=ROOT` reads the
  class folder ROOT instead (prepared on first use)."""
  c = tiny()
  c.dataset.eval_split = 'validation[:64]'
  c.eval_batch_size = 32
  c.log_every_steps = 1
  c.sharding_min_size = 256
  # Adam divides by sqrt(v) + eps: with the default 1e-8, gradients at float32 noise level
  # (reduced in another order by another process layout) become O(lr) updates. A large eps
  # keeps updates proportional to gradients, so layouts compare closely (as test_sharding).
  c.optim.eps = 1e-3
  root = config_lib.parse_arg(arg).get('folder')
  if root:
    c.dataset.name = 'class_folder'
    c.dataset.builder_kwargs.root = root
    c.dataset.eval_split = 'validation'
    c.eval_batch_size = 12
  return c
