"""isotropic small from scratch on ImageNet-1K at 224 (top-1 78.7%, EMA; paper 79.7%).

  python -m convnext_jax.main --config configs/convnext_iso_s_in1k.py \
      --workdir gs://BUCKET/convnext_isotropic_small

As the hierarchical recipe but with a 50-epoch warmup; drop path 0.1, no layer scale.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.in1k(
      'convnext_isotropic_small', drop_path_rate=0.1, arg=arg, warmup_epochs=50.0
  )
