"""Agreement between processes through jax.distributed's coordination service.

Device collectives (`multihost_utils.broadcast_one_to_all`, `sync_global_devices`) are the
wrong tool where processes may arrive minutes apart, such as around preparing a dataset: on
CPU, gloo gives up when a peer is 30 s late. The coordination service's key-value store and
barriers wait as long as they are told, and fail with a message when a process has died.

Every process must make the same calls in the same order (the calls are numbered, so a name
may be used again). Without `jax.distributed` (one process) they return at once.
"""

import itertools

from absl import logging
import jax
import orbax.checkpoint as ocp

# Long enough for process 0 to prepare a large folder of images while the others wait.
DEFAULT_TIMEOUT_S = 4 * 3600
_calls = itertools.count()


def _client():
  """jax.distributed's coordination client, or None without `jax.distributed.initialize`.

  jax has no public accessor for it; orbax's public `multihost` API gives it (orbax
  coordinates its own multi-process saves through the same client).
  """
  if not ocp.multihost.is_jax_distributed_client_initialized():
    return None
  return ocp.multihost.get_jax_distributed_client()


def _key(name: str) -> str:
  return f'convnext_jax/{next(_calls)}/{name}'


def decide_on_process_0(name: str, decide, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
  """`decide()` (a str) evaluated on process 0 only, and its result on every process."""
  client = _client()
  if client is None:
    return decide()
  key = _key(name)
  if jax.process_index() == 0:
    value = decide()
    client.key_value_set(key, value)
    return value
  return client.blocking_key_value_get(key, int(timeout_s * 1000))


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Waits until every process has reached the barrier `name`."""
  client = _client()
  if client is None:
    return
  logging.info('waiting for every process at %r', name)
  client.wait_at_barrier(_key(name), int(timeout_s * 1000))
