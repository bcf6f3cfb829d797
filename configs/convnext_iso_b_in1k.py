"""convnext_isotropic_base on ImageNet-1K from scratch at 224 (published top-1 82.0%, EMA).

  python -m convnext_jax.main --config configs/convnext_iso_b_in1k.py \
      --workdir gs://BUCKET/convnext_isotropic_base

As the hierarchical recipe but with a 50-epoch warmup; drop path 0.2, no layer scale.
"""

from convnext_jax import config_lib


def get_config(arg=None):
  return config_lib.in1k('convnext_isotropic_base', drop_path_rate=0.2, arg=arg, warmup_epochs=50.0)
