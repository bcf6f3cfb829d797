"""convnext_tiny from scratch on ImageNet-1K at 224 (published top-1 82.1%, EMA).

  python -m convnext_jax.main --config configs/convnext_t_in1k.py \
      --workdir gs://BUCKET/convnext_tiny_in1k

300 epochs, AdamW lr 4e-3 at batch 4096, 20 warmup epochs, weight decay 0.05, drop path 0.1,
RandAugment, Mixup/CutMix, Random Erasing, label smoothing 0.1, EMA 0.9999.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.in1k('convnext_tiny', drop_path_rate=0.1, arg=arg)
