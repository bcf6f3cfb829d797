"""Shared test helpers."""

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_jax import models


def random_params(model, seed: int = 0):
  """Random float32 numpy params for `model`, shaped by `jax.eval_shape` (no jitted init:
  compiling dozens of RNG calls costs XLA:CPU seconds). Values exercise every tensor:
  fan-in-scaled kernels, LayerNorm scales near 1, and order-0.1 biases, layer scales and GRN
  parameters."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if name == 'kernel':
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.1 * noise
    else:
      value = 0.1 * noise
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(model, image_size=32))


_FORWARD_CACHE = {}


def forward(model, params, images_nhwc):
  """(logits, stage maps) of `model`, jitted once per model configuration."""
  key = repr(model)
  if key not in _FORWARD_CACHE:

    def both(p, x):
      variables = {'params': p}
      return model.apply(variables, x), model.apply(variables, x, output='stages')

    _FORWARD_CACHE[key] = jax.jit(both)
  logits, stages = _FORWARD_CACHE[key](params, images_nhwc)
  return np.asarray(logits), [np.asarray(s) for s in stages]


def images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """Random NCHW float32 images (PyTorch layout); `.transpose(0, 2, 3, 1)` for Flax."""
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _largest_array_file(step_dir):
  # Its array data: the largest file of the step's train state.
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def scramble_array_data(step_dir):
  """Damages a checkpoint step (a pathlib.Path): 4 KiB of random bytes in the middle of the
  largest file of its train state (its array data), the size unchanged."""
  path = _largest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2 - 2048
  data[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
  path.write_bytes(bytes(data))


def truncate_array_data(step_dir):
  """Damages a checkpoint step (a pathlib.Path): the largest file of its train state (its
  array data) cut to half its size."""
  path = _largest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


_SMALL_DISK_MARK = '--- small disk after the command ---'


def run_on_small_disk(
    cmd: list[str],
    mount_dir: str,
    size: str,
    before: str = '',
    after: str = 'find "$DISK" -mindepth 1 -printf "%P %s\\n" | sort',
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> tuple[int, str, str, str]:
  """Runs `cmd` with a fresh tmpfs of `size` (e.g. '4m') mounted at `mount_dir`.

  The mount lives in a private mount namespace (`unshare -m` as root, else `unshare -rm` in
  a user namespace), so it vanishes with the command and nothing is left to unmount; outside,
  `mount_dir` stays an empty directory. Shell snippets `before` and `after` run in the same
  namespace, before and after `cmd`, with `$DISK` set to `mount_dir`: `before` fills the disk
  (it must succeed), `after` reports what the command left on it (by default one
  'relative/path size' line per entry, sorted; '' when the disk is empty).

  Args:
    cmd: the command and its arguments (not through a shell).
    mount_dir: an existing, empty directory to mount the tmpfs on.
    size: tmpfs size, as `mount -o size=` takes it.
    before: shell commands run on the mounted disk before `cmd`.
    after: shell commands whose stdout is returned as `listing`.
    env: environment of `cmd` (default: this process's).
    timeout: seconds before the whole process group is killed and the test fails.

  Returns:
    (returncode of cmd, its stdout, its stderr, the stdout of `after`).
  """
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  import pytest  # pylint: disable=g-import-not-at-top

  if not shutil.which('unshare'):
    pytest.skip('run_on_small_disk needs unshare (util-linux) to mount a private tmpfs')
  unshare = (
      ['unshare', '-m', '--propagation', 'private']
      if os.geteuid() == 0
      else ['unshare', '-r', '-m', '--propagation', 'private']
  )
  # Exit 97/98 (with no mark printed) say the mount or `before` failed, so cmd never ran.
  script = f"""
mount -t tmpfs -o size={size} tmpfs "$DISK" || exit 97
(
set -e
{before}
) || exit 98
"$@"
status=$?
echo '{_SMALL_DISK_MARK}'
{after}
exit $status
"""
  env = dict(os.environ if env is None else env, DISK=mount_dir)
  proc = subprocess.Popen(
      unshare + ['sh', '-c', script, 'sh'] + list(cmd),
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
  )
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # sh and the command it started, nothing else.
    proc.communicate()
    raise AssertionError(f'{cmd} on a {size} tmpfs ran past {timeout} s') from None
  if _SMALL_DISK_MARK not in out:
    if proc.returncode == 98:
      raise AssertionError(f'`{before}` failed on the {size} tmpfs: {err.strip()}')
    # 97: mount refused; otherwise unshare itself was refused (no namespaces for us).
    pytest.skip(
        f'cannot mount a tmpfs in a private mount namespace ({" ".join(unshare)}): '
        f'{err.strip()}'
    )
  out, listing = out.split(_SMALL_DISK_MARK + '\n', 1)
  return proc.returncode, out, err, listing


def saved_state(workdir, step: int | None = None) -> dict[str, np.ndarray]:
  """A training workdir's train state at `step` (default: the newest), by '/'-joined leaf
  name, as orbax itself restores it onto the host (not through `convnext_jax.checkpoints`)."""
  directory = epath.Path(workdir) / 'checkpoints'
  if step is None:
    step = max(ocp.utils.checkpoint_steps(directory))
  item = directory / str(step) / 'state'
  tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ocp.PyTreeCheckpointer().restore(
      item, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)
  )
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(v) for p, v in flat}
