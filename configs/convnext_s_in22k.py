"""convnext_small pre-training on ImageNet-22K (21841 classes) at 224.

  python -m convnext_jax.main --config configs/convnext_s_in22k.py \
      --workdir gs://BUCKET/convnext_small_in22k

90 epochs, 5 warmup epochs, AdamW lr 4e-3 at batch 4096, weight decay 0.05, drop path 0.0,
no EMA; the rest of the ImageNet-1K recipe. Fine-tune with convnext_s_in22k_ft_in1k.py
(published 22K->1K top-1: 84.6% at 224, 85.8% at 384).
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.in22k('convnext_small', drop_path_rate=0.0, arg=arg)
