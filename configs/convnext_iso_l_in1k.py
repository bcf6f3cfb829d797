"""convnext_isotropic_large on ImageNet-1K from scratch at 224 (published top-1 82.6%, EMA).

  python -m convnext_jax.main --config configs/convnext_iso_l_in1k.py \
      --workdir gs://BUCKET/convnext_isotropic_large

As the hierarchical recipe but with a 50-epoch warmup; drop path 0.5, layer scale 1e-6.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.in1k(
      'convnext_isotropic_large', drop_path_rate=0.5, arg=arg, warmup_epochs=50.0
  )
