"""convnext_large: fine-tune ImageNet-1K 224 weights at 384 (published top-1 85.5%).

  python -m convnext_jax.main \
      --config configs/convnext_l_in1k_ft_384.py:init=gs://BUCKET/convnext_large_in1k \
      --workdir gs://BUCKET/convnext_large_in1k_384

Starts from the EMA weights of the 224 run (its best checkpoint: add `,step=N`). AdamW lr
5e-5 at batch 512, weight decay 1e-8, 30 epochs, cosine without warmup, layer decay 0.7,
drop path 0.95, no Mixup/CutMix, no EMA; evaluation resizes straight to 384x384.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune(
      'convnext_large', drop_path_rate=0.95, layer_decay=0.7, arg=arg, default_res=384
  )
