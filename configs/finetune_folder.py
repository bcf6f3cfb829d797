"""Fine-tune a pre-trained ConvNeXt on your own images: a folder of class sub-folders.

  convnext-convert import convnext_tiny_22k_1k_224.pth /ckpt/convnext_tiny
  python -m convnext_jax.main \
      --config configs/finetune_folder.py:root=/data/flowers,init=/ckpt/convnext_tiny \
      --workdir /tmp/flowers

Layout: root/train/<class>/<image> and root/val/<class>/<image> (also 'validation' or
'test'); any image format Pillow reads. The folder is converted to a tfds dataset on first
use. Arguments: root=DIR, init=PATH (a converted checkpoint or a training workdir),
model=NAME (must match init; default convnext_tiny), res=224, epochs=30, batch=128.
The head is replaced (head_init_scale 0.001) when the class count differs; lr 1e-4 at the
given batch with 1 warmup epoch, layer decay 0.8, weight decay 0.05, label smoothing 0.1,
RandAugment and Random Erasing on, Mixup/CutMix off, EMA 0.999.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base()
  config_lib.finetune_recipe(
      c,
      args.get('model') or 'convnext_tiny',
      drop_path_rate=0.1,
      layer_decay=0.8,
      arg=arg,
      ema=True,
      default_res=224,
  )
  c.dataset.name = 'class_folder'
  c.dataset.builder_kwargs.root = args.get('root', '')
  c.dataset.eval_split = 'validation'
  c.global_batch_size = int(args.get('batch') or 128)
  c.eval_batch_size = c.global_batch_size
  c.num_epochs = float(args.get('epochs') or 30)
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 1.0
  c.ema.decay = 0.999
  if not c.dataset.builder_kwargs.root and 'runlocal' not in args:
    raise ValueError('append :root=DIR (root/train/<class>/<image>) to the config')
  config_lib.require_init(c, arg)
  return config_lib.finalize(c, arg)
