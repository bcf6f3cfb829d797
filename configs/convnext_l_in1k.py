"""convnext_large from scratch on ImageNet-1K at 224 (published top-1 84.3%, EMA).

  python -m convnext_jax.main --config configs/convnext_l_in1k.py \
      --workdir gs://BUCKET/convnext_large_in1k

300 epochs, AdamW lr 4e-3 at batch 4096, 20 warmup epochs, weight decay 0.05, drop path 0.5,
RandAugment, Mixup/CutMix, Random Erasing, label smoothing 0.1, EMA 0.9999.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.in1k('convnext_large', drop_path_rate=0.5, arg=arg)
