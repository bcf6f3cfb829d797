"""A harness for multi-process JAX tests: N processes with K CPU devices each, joined by
`jax.distributed` on a free 127.0.0.1 port, bounded by a timeout.

`launch(args, ...)` starts `python ARGS --jax_coordinator_address=127.0.0.1:PORT
--jax_num_processes=N --jax_process_id=I` once per process (the flags of
`convnext_jax.main`, which `tests/mp_worker.py` reuses), each with its own log file, and
`Launch.wait()` collects exit codes and logs. Once a process fails, the others get a grace
period and are then killed, as a cluster scheduler would: a survivor would otherwise wait for
the dead one until jax's heartbeat timeout. Only the processes started here are ever
signalled, by pid.

The persistent compilation cache is off in these processes: jax keys its entries by process
and only process 0 writes them, so with it process 0 would skip compiles that process 1
still makes, reach collectives far ahead of it and, on CPU, trip gloo's 30 s timeout.
"""

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


# The processes compile without LLVM's optimisations, which compiles these tiny programs
# markedly faster (compilation is most of a test run's time); every process does the same,
# so results still compare exactly between them.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def cpu_env(devices: int = 1, fast_compile: bool = True, **extra: str) -> dict[str, str]:
  """This process's environment for a subprocess of jax on `devices` CPU devices, with
  `extra` variables set. It compiles as every test does (`FAST_COMPILE`) unless
  `fast_compile` is False: for a run of many steps, which optimised code finishes sooner."""
  flags = f'--xla_force_host_platform_device_count={devices}'
  return dict(
      os.environ,
      XLA_FLAGS=f'{flags} {FAST_COMPILE}' if fast_compile else flags,
      JAX_PLATFORMS='cpu',
      **extra,
  )


def trainer_args(config, workdir, data_dir, *flags: str) -> list[str]:
  """The interpreter's arguments for `python -m convnext_jax.main` training `config` (a file,
  with its `:arg` if any) in `workdir` on the datasets of `data_dir`, then `flags`."""
  return [
      '-m',
      'convnext_jax.main',
      f'--config={config}',
      f'--workdir={workdir}',
      f'--config.dataset.data_dir={data_dir}',
      *flags,
  ]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Result:
  index: int
  returncode: int | None  # None: still running at the timeout (then killed).
  log: str
  killed: bool = False  # Killed by the harness (timeout, or after another process failed).


class Failed(AssertionError):
  pass


@dataclasses.dataclass
class Launch:
  """Processes started by `launch`; `wait()` ends them all."""

  procs: list[subprocess.Popen]
  logs: list[pathlib.Path]
  deadline: float
  grace: float
  _results: list[Result] | None = None

  @property
  def pids(self) -> list[int]:
    return [p.pid for p in self.procs]

  def send_signal(self, index: int, signum: int) -> None:
    if self.procs[index].poll() is None:
      self.procs[index].send_signal(signum)

  def wait(self) -> list[Result]:
    """Waits for every process (killing all at the deadline, and the rest a grace period
    after one fails); returns their results."""
    if self._results is not None:
      return self._results
    killed = set()
    failed_at = None
    try:
      while any(p.poll() is None for p in self.procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
          failed_at = now
        if now > self.deadline or (failed_at is not None and now > failed_at + self.grace):
          for i, p in enumerate(self.procs):
            if p.poll() is None:
              p.kill()
              killed.add(i)
          for p in self.procs:
            p.wait()
          break
        time.sleep(0.2)
    except BaseException:
      # An interrupted test run (Ctrl-C, pytest's timeout) must not leave its workers
      # training on: they ignore SIGTERM (jax.distributed's preemption notice owns it).
      for p in self.procs:
        p.kill()
        p.wait()
      raise
    self._results = [
        Result(
            i,
            None if i in killed else p.returncode,
            path.read_text(errors='replace'),
            killed=i in killed,
        )
        for i, (p, path) in enumerate(zip(self.procs, self.logs))
    ]
    return self._results

  def check(self) -> list[Result]:
    """`wait()`, then raises unless every process exited 0."""
    results = self.wait()
    if any(r.returncode != 0 for r in results):
      raise Failed(describe(results))
    return results


def describe(results: list[Result], tail: int = 3000) -> str:
  return '\n'.join(
      f'--- process {r.index}: exit {r.returncode}'
      f'{" (killed by the harness)" if r.killed else ""} ---\n{r.log[-tail:]}'
      for r in results
  )


def launch(
    args: list[str],
    num_processes: int,
    devices_per_process: int,
    *,
    log_dir,
    timeout: float,
    env: dict[str, str] | None = None,
    grace: float = 20.0,
    per_process_args=None,
) -> Launch:
  """Starts `python ARGS` as `num_processes` joined JAX processes.

  Args:
    args: the interpreter's arguments, e.g. ['-m', 'convnext_jax.main', '--config', ...].
    num_processes: N.
    devices_per_process: K CPU devices each (`--xla_force_host_platform_device_count`).
    log_dir: where process_<i>.log (stdout and stderr) are written.
    timeout: seconds until every process still running is killed.
    env: extra environment variables.
    grace: seconds the others may still run after one process fails.
    per_process_args: optional function index -> extra arguments.
  """
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  port = free_port()
  base_env = cpu_env(
      devices_per_process, TF_CPP_MIN_LOG_LEVEL='2', JAX_ENABLE_COMPILATION_CACHE='false'
  )
  base_env.pop('JAX_COMPILATION_CACHE_DIR', None)
  base_env.update(env or {})
  procs, logs = [], []
  try:
    for i in range(num_processes):
      command = [
          sys.executable,
          *args,
          f'--jax_coordinator_address=127.0.0.1:{port}',
          f'--jax_num_processes={num_processes}',
          f'--jax_process_id={i}',
          *(per_process_args(i) if per_process_args else []),
      ]
      path = log_dir / f'process_{i}.log'
      with open(path, 'w') as log:
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=base_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
      logs.append(path)
  except BaseException:
    for p in procs:
      p.kill()
      p.wait()
    raise
  return Launch(procs, logs, time.monotonic() + timeout, grace)


def run(args: list[str], num_processes: int, devices_per_process: int, **kwargs) -> list[Result]:
  """`launch(...).check()`: every process must exit 0."""
  return launch(args, num_processes, devices_per_process, **kwargs).check()


__all__ = ['Failed', 'Launch', 'Result', 'describe', 'free_port', 'launch', 'run']
