"""ImageNet-1K fine-tuning of a ConvNeXt-V2 from its FCMAE pre-training, the official
recipe (published top-1 at 224: atto 76.7, femto 78.5, pico 80.3, nano 81.9, tiny 83.0,
base 84.9, large 85.8, huge 86.3).

  python -m convnext_jax.main \
      --config configs/fcmae_finetune.py:model=base,init=gs://BUCKET/fcmae_convnextv2_base \
      --workdir gs://BUCKET/convnextv2_base_ft

Batch 1024, RandAugment, Random Erasing 0.25, EMA 0.9999, layer-wise lr decay; epochs, lr,
warmup, decay, drop path and Mixup/CutMix by size as ConvNeXt-V2's TRAINING.md gives them
for atto, tiny and base (the other sizes take the nearest of those). The decoder is dropped;
the head (std 2e-5) and the final norm start fresh.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.fcmae_finetune(arg)
