"""convnext_base: fine-tune ImageNet-22K weights on ImageNet-1K at 224 or 384.

  python -m convnext_jax.main \
      --config configs/convnext_b_in22k_ft_in1k.py:init=gs://BUCKET/convnext_base_in22k,res=224 \
      --workdir gs://BUCKET/convnext_base_in22k_ft_in1k_224

Published top-1: 85.8% at res=224, 86.8% at res=384. `init` is the 22K training
workdir (or a `convnext-convert import` of the official 22K .pth); its 21841-class head is
replaced by a 1000-class one at head_init_scale 0.001. AdamW lr 5e-5 at batch 512, weight
decay 1e-8, 30 epochs, cosine without warmup, layer decay 0.8, drop path 0.2, no
Mixup/CutMix, no EMA.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune(
      'convnext_base', drop_path_rate=0.2, layer_decay=0.8, arg=arg, ema=False
  )
