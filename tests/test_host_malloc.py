"""host_malloc: XLA:CPU's per-execution scratch stays mapped from one call to the next.

Each case runs a fresh process (malloc's settings are the whole process's, and JAX's dispatch
is set before the backend starts): a jitted program whose scratch XLA plans at 96 MiB (a
running sum; above the 64 MiB that a worker thread's glibc arena holds), called 25 times (2
by default) and then 5 more, with the page faults of those 5 counted by the kernel
(`getrusage`). The expected counts come from XLA's own memory plan of the program: by
default every call maps the scratch afresh and faults in at least one page per 4 KiB of it;
configured, once the heap has settled, calls fault almost none. Either half alone (the
dispatch in the calling thread, or no `mmap` once set up) leaves at least four fifths of the
default's faults: `test_configured_the_scratch_stays_mapped` fails without either (checked).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import json, resource, sys
    from convnext_jax import host_malloc
    # Configured: until the heap has settled (measured: 6 calls for this program).
    WARMUP = 2 if sys.argv[1] == 'default' else 25
    configured = host_malloc.configure() if sys.argv[1] != 'default' else None
    import jax, jax.numpy as jnp
    if sys.argv[1] == 'decide':  # Whether it applies, without starting a backend.
      print(json.dumps({'configured': configured,
                        'async_dispatch': jax.config.read('jax_cpu_enable_async_dispatch')}))
      sys.exit()
    if configured:  # As the trainer's loop starts.
      assert host_malloc.reuse_large_allocations()

    def f(x):  # The running sum along the rows is the scratch: 96 MiB for x's 48.
      return jnp.cumsum(x, axis=0).sum()

    x = jnp.ones((12 * 1024, 1024), jnp.float32)
    compiled = jax.jit(f).lower(x).compile()
    for _ in range(WARMUP):
      compiled(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      compiled(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({'configured': configured, 'faults_per_call': faults,
                      'scratch_bytes': compiled.memory_analysis().temp_size_in_bytes}))
""")


def _probe(mode: str, **env) -> dict:
  # The settings the module defers to, unset unless a case sets them.
  deferred = ('MALLOC_', 'GLIBC_TUNABLES', 'JAX_CPU_ENABLE_ASYNC_DISPATCH')
  environ = {k: v for k, v in os.environ.items() if not k.startswith(deferred)}
  # XLA's default optimisation (not the suite's fast compile, under which the calls take
  # 10x as long) on one device.
  environ['XLA_FLAGS'] = ''
  environ.update(env)
  out = subprocess.run(
      [sys.executable, '-c', _PROBE, mode],
      env=environ,
      capture_output=True,
      text=True,
      timeout=120,
      check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def unconfigured():
  return _probe('default')


def test_glibc_maps_the_scratch_afresh_on_every_call_by_default(unconfigured):
  # The problem the module solves, on this machine: without it, each call faults in
  # (nearly) every page of the scratch.
  pages = unconfigured['scratch_bytes'] / 4096
  assert unconfigured['scratch_bytes'] >= 96 * 2**20
  assert unconfigured['faults_per_call'] >= 0.9 * pages


def test_configured_the_scratch_stays_mapped(unconfigured):
  result = _probe('configure')
  assert result['configured'] is True
  assert result['scratch_bytes'] == unconfigured['scratch_bytes']
  assert result['faults_per_call'] < 0.01 * result['scratch_bytes'] / 4096


@pytest.mark.parametrize(
    'env',
    [
        {'MALLOC_ARENA_MAX': '8'},  # The user's own malloc settings win.
        {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=8'},
    ],
)
def test_the_users_own_malloc_settings_win(env):
  assert _probe('decide', **env) == {'configured': False, 'async_dispatch': True}


@pytest.mark.parametrize('platforms', ['tpu', 'cuda,cpu'])
def test_accelerator_runs_keep_jax_and_glibcs_defaults(platforms):
  assert _probe('decide', JAX_PLATFORMS=platforms) == {
      'configured': False,
      'async_dispatch': True,
  }


def test_a_cpu_run_is_configured():
  assert _probe('decide', JAX_PLATFORMS='cpu') == {'configured': True, 'async_dispatch': False}


def test_the_users_own_dispatch_setting_wins():
  assert _probe('decide', JAX_PLATFORMS='cpu', JAX_CPU_ENABLE_ASYNC_DISPATCH='1') == {
      'configured': True,
      'async_dispatch': True,
  }
