"""FCMAE pre-training of ConvNeXt-V2 (the masked autoencoder V2 was published with), on
ImageNet-1K at 224, the official recipe.

  python -m convnext_jax.main --config configs/fcmae_pretrain.py:model=base \
      --workdir gs://BUCKET/fcmae_convnextv2_base

1600 epochs at batch 4096 (epochs=800 for the paper's ablation length), AdamW betas
(0.9, 0.95), lr 2.4e-3 (1.5e-4 x 4096 / 256), 40 warmup epochs, cosine to 0, weight decay
0.05, float32; RandomResizedCrop(0.2-1) and flips; 60% of each image's 32-px cells masked.
Fine-tune the result with configs/fcmae_finetune.py:model=base,init=WORKDIR.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.fcmae_pretrain(arg)
