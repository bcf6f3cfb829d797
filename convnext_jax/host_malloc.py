"""glibc's malloc set up for JAX on the CPU: each step's scratch memory reused, not mapped anew.

XLA:CPU gives every execution of a compiled program its scratch memory as one allocation
(`posix_memalign`, from one of its worker threads): 187 MiB for convnext_atto's training step
at 64 px, batch 32. glibc serves an allocation that large from a fresh `mmap` (anything over
32 MiB, and a worker thread's own arena cannot hold more than 64 MiB anyway) and unmaps it
when it is freed, so each step faults every page of its scratch in again and the kernel
zeroes them: measured on a 2-core host, 49,000 page faults and 90-120 ms of kernel time per
step of 150-200 ms, a third of the step's CPU time. PyTorch's eager step, whose tensors are
each under glibc's mmap threshold, faults a few hundred pages per step.

Two calls, as an entry point runs:
- `configure()`, before JAX starts its CPU backend (a thread takes its arena at its first
  allocation): every thread allocates from glibc's main arena, the one whose heap can grow
  past 64 MiB. Alone this changes little.
- `reuse_large_allocations()`, once the run is set up and about to repeat its steps (the
  trainer's loop, a benchmark's timing): no more `mmap`, and freed memory is never given back
  to the system, so the scratch of one step is the scratch of the next, already mapped (0
  page faults per step; docs/benchmarks.md has the step's times). Not earlier: a restore's
  transient host buffers, each mapped and unmapped on its own, would otherwise fragment the
  heap and raise the restore's peak (convnext_large resuming: 1.45 -> 1.58 train states).

The price: with one arena, threads that allocate at once wait for each other. XLA's
compilation of convnext_atto's train step took 20.3-21.8 s against 16.6-16.9 s (alternating
processes), and at the demo's 40 px, where the step's scratch is smaller, the demo ran 235 s
against 212 s without; the steps repeat, the compile does not, and larger steps gain far
more: convnext_tiny's at 224 px, batch 8, 1815 -> 1379 ms (its 1.8 GiB scratch faulted in
every step: 469,000 faults, 879 ms of kernel time; docs/benchmarks.md). The tests do not
call these (their steps are small); the trainers they start do.

Together they do what `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` does
from the environment, for the steps only. They apply only where it helps and nothing else is
in charge:
- JAX will run on the CPU: `JAX_PLATFORMS` (or `jax.config.jax_platforms`) names `cpu`
  first, or no accelerator plugin is installed (no `jax_plugins` entry point, no `libtpu`).
  On TPU and GPU hosts the scratch lives in device memory and the input pipeline's many
  threads are better served by glibc's per-thread arenas: nothing changes there.
- The C library has `mallopt` (glibc).
- The user has not set glibc's malloc options or preloaded another allocator (a `MALLOC_*`
  variable, `glibc.malloc` in `GLIBC_TUNABLES`, `LD_PRELOAD`): theirs win. So
  `MALLOC_ARENA_MAX=8 convnext-train ...` leaves glibc to the environment.
"""

import ctypes
import importlib.metadata
import importlib.util
import os

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): freed memory is never returned.
_NEVER_TRIM = 2**31 - 1

_USER_SETTINGS = ('MALLOC_', 'LD_PRELOAD')


def _runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without starting a backend."""
  import jax  # pylint: disable=g-import-not-at-top (only the config is read)

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
  """Puts every thread on glibc's main arena, where JAX runs on the CPU and the environment
  sets no malloc options (the module docstring). Call before JAX starts its backend.

  Returns:
    Whether it did (then `reuse_large_allocations` applies too).
  """
  global _mallopt_applied
  if _mallopt_applied is None:
    mallopt = _mallopt()
    if mallopt and mallopt(_M_ARENA_MAX, 1):
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
