"""Test setup: 8 host CPU devices (for sharding tests) before jax initialises, and fixtures."""

import os
import sys

# Must precede any jax import: jax reads these once, when its backend starts.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

sys.path.insert(0, os.path.dirname(__file__))  # torch_reference and helpers
