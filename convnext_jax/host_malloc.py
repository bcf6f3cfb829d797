"""glibc's malloc set up for JAX on the CPU: each step's scratch memory reused, not mapped anew.

XLA:CPU gives every execution of a compiled program its scratch memory as one allocation
(`posix_memalign`): 187 MiB for convnext_atto's training step at 64 px, batch 32. glibc serves
an allocation that large from a fresh `mmap` and unmaps it when it is freed, so each step
faults every page of its scratch in again and the kernel zeroes them: measured on a 2-core
host, 49,000 page faults and 90-120 ms of kernel time per step of 150-200 ms, a third of the
step's CPU time. PyTorch's eager step, whose tensors are each under glibc's mmap threshold,
faults a few hundred pages per step.

Two calls, as an entry point runs:
- `configure()`, before JAX starts its CPU backend: JAX runs a single-device program in the
  thread that calls it (`jax_cpu_enable_async_dispatch` off), so its scratch comes from that
  thread's arena, the main one. By default a worker thread runs it, and a worker thread's
  arena cannot hold more than 64 MiB: there glibc maps anything larger whatever its options
  say. And glibc's mmap threshold stays at its initial 128 KiB: by default it rises to the
  size of each mapped block freed (up to 32 MiB), after which a restore's transient host
  buffers come from the heap, where they fragment it and stay. Kept mapped, each goes back
  when freed: convnext_large resuming peaks at 1.16 train states above the imports, against
  1.45-1.47 by glibc's default (`benchmark resume`; docs/benchmarks.md).
- `reuse_large_allocations()`, once the run is set up and about to repeat its steps (the
  trainer's loop, a benchmark's timing): no more `mmap`, and freed memory is never given back
  to the system, so the scratch of one step is the scratch of the next, already mapped (0
  page faults per step; docs/benchmarks.md has the step's times). Not earlier: the restore's
  buffers would stay in the heap (above).

The first version put every thread on the main arena instead (`M_ARENA_MAX=1`): the same 0
faults per step, but threads that allocate at once then wait for each other, and XLA's
compilation, many threads allocating, took a quarter longer (a 4-step demo run: 56 CPU-s
against 45 without). Dispatching in the caller keeps glibc's per-thread arenas for everyone
else, and the step gains too: convnext_atto's step at 64 px, batch 32, 111 and 90 ms against
129 and 185 ms with one arena and 148 and 179 ms by default (two rounds, one process each;
docs/benchmarks.md).

A program sharded over several CPU devices is dispatched to worker threads whatever the
setting (JAX's flag covers single-device programs): its per-device scratch is still mapped
afresh where it is over glibc's threshold. One CPU device is what a CPU host trains on; the
virtual devices of `--xla_force_host_platform_device_count` are for testing sharding.

Together they do, for the steps only, what no environment variable alone does. They apply
only where it helps and nothing else is in charge:
- JAX will run on the CPU: `JAX_PLATFORMS` (or `jax.config.jax_platforms`) names `cpu`
  first, or no accelerator plugin is installed (no `jax_plugins` entry point, no `libtpu`).
  On TPU and GPU hosts the scratch lives in device memory: nothing changes there.
- The C library has `mallopt` (glibc).
- The user has not set glibc's malloc options or preloaded another allocator (a `MALLOC_*`
  variable, `glibc.malloc` in `GLIBC_TUNABLES`, `LD_PRELOAD`): theirs win. So
  `MALLOC_ARENA_MAX=8 convnext-train ...` leaves glibc and JAX's dispatch as they are.
  `JAX_CPU_ENABLE_ASYNC_DISPATCH`, where set, keeps the dispatch the user chose.
"""

import ctypes
import importlib.metadata
import importlib.util
import os

import jax

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc's initial mmap threshold, which `configure` keeps from rising.
_MMAP_THRESHOLD = 128 * 1024
# The largest trim threshold mallopt takes (an int): freed memory is never returned.
_NEVER_TRIM = 2**31 - 1

_USER_SETTINGS = ('MALLOC_', 'LD_PRELOAD')
_ASYNC_DISPATCH_ENV = 'JAX_CPU_ENABLE_ASYNC_DISPATCH'


def _runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without starting a backend (from its config)."""
  platforms = jax.config.jax_platforms  # JAX_PLATFORMS, unless set in code.
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  has_plugin = bool(importlib.metadata.entry_points(group='jax_plugins'))
  return not (
      has_plugin
      or importlib.util.find_spec('jax_plugins') is not None
      or importlib.util.find_spec('libtpu') is not None
  )


def _user_sets_malloc() -> bool:
  """Whether the environment sets malloc options of its own (then it stays in charge)."""
  return any(n.startswith(_USER_SETTINGS) and v for n, v in os.environ.items()) or (
      'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', '')
  )


# glibc's `mallopt` once `configure` has applied (the decision is taken once, there).
_mallopt_applied = None


def configure() -> bool:
  """Has JAX run single-device programs in the calling thread and keeps glibc's mmap
  threshold where it starts, where JAX runs on the CPU and the environment sets no malloc
  options (the module docstring). Call before JAX starts its backend.

  Returns:
    Whether it applies (then `reuse_large_allocations` does too).
  """
  global _mallopt_applied
  if _mallopt_applied is None:
    mallopt = _mallopt()
    if mallopt and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD):
      if _ASYNC_DISPATCH_ENV not in os.environ:
        jax.config.update('jax_cpu_enable_async_dispatch', False)
      _mallopt_applied = mallopt
  return _mallopt_applied is not None


def reuse_large_allocations() -> bool:
  """Once the run is set up: large allocations from the heap, never unmapped, so that the
  steps reuse their scratch (the module docstring). Nothing unless `configure` applied.

  Returns:
    Whether it did.
  """
  mallopt = _mallopt_applied
  # Both, or the scratch still comes and goes: an allocation over the mmap threshold is
  # mapped, and a heap trimmed at its top faults its pages in again.
  return bool(mallopt and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def _mallopt():
  """glibc's `mallopt`, or None where it does not apply (accelerators, the user's own
  malloc settings, no glibc)."""
  if _user_sets_malloc() or not _runs_on_cpu():
    return None
  try:
    mallopt = ctypes.CDLL(None).mallopt  # The C library the process runs on.
  except (AttributeError, OSError):  # No mallopt (macOS): nothing to set.
    return None
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return mallopt
