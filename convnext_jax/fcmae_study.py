"""The FCMAE --mini track: pre-training ConvNeXt-V2 with FCMAE on a CPU, then fine-tuning it,
beside the same fine-tuning from random weights, with a table of the three.

  python -m convnext_jax.fcmae_study --workdir DIR --mini [--model atto] [--verbose]

Three runs, each in its own sub-workdir, through `train.train_and_evaluate`:
  DIR/pretrain   configs/fcmae_pretrain.py:mini   (fcmae_convnextv2_<model>, 96 px)
  DIR/finetune   configs/fcmae_finetune.py:mini,init=DIR/pretrain   (convnextv2_<model>, 64 px)
  DIR/scratch    configs/fcmae_finetune.py:mini,scratch   (the same run, random weights)
on the built-in `convnext_shapes` dataset (`config_lib.fcmae_mini`). A run that was
interrupted resumes from its checkpoints; a finished one (`DIR/<run>/fcmae_result.json`) is
skipped. Then `DIR/fcmae.md` (each run's evaluation, steps and wall time) and
`DIR/fcmae_loss.png` (the pre-training loss, and the two fine-tuning losses) are written; the
reconstructions of each pre-training evaluation are in `DIR/pretrain/reconstructions/`.

Only the CPU track is defined (`--mini` is required): full-scale pre-training and fine-tuning
are the two configs themselves (README, "FCMAE"). Errors are one line on stderr: exit status
2 for flags, 1 for a run that cannot go on (`train.RUN_ERRORS`).
"""

import argparse
import json
import sys
import time
from typing import Any

from absl import flags as absl_flags
from absl import logging
from etils import epath

from convnext_jax import config_lib
from convnext_jax import configs
from convnext_jax import console
from convnext_jax import host_malloc

PROG = 'convnext_jax.fcmae_study'
RESULT_FILE = 'fcmae_result.json'
TABLE_FILE = 'fcmae.md'
CHART_FILE = 'fcmae_loss.png'
RUNS = ('pretrain', 'finetune', 'scratch')


def run_configs(workdir: str, size: str) -> dict[str, Any]:
  """The three runs' configs, by run name."""
  pretrain = str(epath.Path(workdir) / 'pretrain')
  return {
      'pretrain': configs.load(f'fcmae_pretrain:mini,model={size}'),
      'finetune': configs.load(f'fcmae_finetune:mini,model={size},init={pretrain}'),
      'scratch': configs.load(f'fcmae_finetune:mini,model={size},scratch'),
  }


def _losses(workdir: str) -> list[tuple[int, float]]:
  """(step, train/loss) from a run's TensorBoard events."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  if not epath.Path(workdir).exists():  # A run not trained (yet).
    return []
  events = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  events.Reload()
  if 'train/loss' not in events.Tags().get('tensors', []):
    return []
  return [
      (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
      for e in events.Tensors('train/loss')
  ]


def train_one(name: str, config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) one run; returns and records its result."""
  from convnext_jax import train  # pylint: disable=g-import-not-at-top (TensorFlow)

  directory = epath.Path(workdir) / name
  result_path = directory / RESULT_FILE
  if result_path.exists():
    console_line(f'{name}: finished before, skipped')
    return json.loads(result_path.read_text())
  start = time.perf_counter()
  last_eval = train.train_and_evaluate(config, str(directory))
  result = {
      'name': name,
      'model': config.model.name,
      'image_size': config.input.image_size,
      'epochs': config.num_epochs,
      'eval': last_eval,
      'seconds': time.perf_counter() - start,
  }
  result_path.write_text(json.dumps(result, indent=1))
  return result


def console_line(text: str) -> None:
  print(f'{PROG}: {text}', flush=True)


def _describe(result: dict[str, Any]) -> str:
  ev = result['eval']
  if any(k.endswith('/loss') for k in ev):
    return ', '.join(
        f'{k.split("/")[-2]} loss {v:.4f}' for k, v in ev.items() if k.endswith('/loss')
    )
  return ', '.join(
      f'{k.split("/")[-2]} top-1 {100 * v:.1f}%' for k, v in ev.items() if k.endswith('/top1')
  )


def table(results: list[dict[str, Any]]) -> str:
  """The Markdown table of the runs."""
  lines = [
      '| run | model | px | epochs | evaluation (validation split) | wall time |',
      '|---|---|---|---|---|---|',
  ]
  for r in results:
    lines.append(
        f'| {r["name"]} | {r["model"]} | {r["image_size"]} | {r["epochs"]:g} | '
        f'{_describe(r)} | {console.duration(r["seconds"])} |'
    )
  total = sum(r['seconds'] for r in results)
  lines.append(f'\nIn all: {console.duration(total)} (runs skipped as finished count as before).')
  return '\n'.join(lines) + '\n'


def chart(workdir: str) -> bytes:
  """PNG: the pre-training loss, and the fine-tuning losses from pre-trained and random
  weights, by step."""
  import io  # pylint: disable=g-import-not-at-top

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  points = _losses(str(epath.Path(workdir) / 'pretrain'))
  if points:
    left.plot(*zip(*points), color='tab:purple')
  left.set(title='FCMAE pre-training', xlabel='step', ylabel='masked reconstruction loss')
  for name, color in (('finetune', 'tab:blue'), ('scratch', 'tab:gray')):
    points = _losses(str(epath.Path(workdir) / name))
    if points:
      right.plot(
          *zip(*points),
          color=color,
          label={'finetune': 'from FCMAE', 'scratch': 'from scratch'}[name],
      )
  right.set(title='fine-tuning', xlabel='step', ylabel='training loss')
  if right.lines:
    right.legend()
  fig.tight_layout()
  out = io.BytesIO()
  fig.savefig(out, format='png', dpi=110)
  plt.close(fig)
  return out.getvalue()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the three runs go in sub-workdirs here')
  parser.add_argument(
      '--mini', action='store_true', help='the CPU track (required: the only one defined)'
  )
  parser.add_argument('--model', default='atto', choices=config_lib.V2_SIZES)
  parser.add_argument('--verbose', action='store_true', help="the libraries' INFO logs too")
  args = parser.parse_args(argv)
  if not args.mini:
    parser.error(
        'only the --mini CPU track is defined; pre-train at full scale with '
        'configs/fcmae_pretrain.py and fine-tune with configs/fcmae_finetune.py'
    )
  host_malloc.configure()  # Before the backend and TensorFlow start their threads.
  absl_flags.FLAGS([PROG])  # absl's own flags (logging) at their defaults.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  console.configure(args.verbose)
  from convnext_jax import train  # pylint: disable=g-import-not-at-top (TensorFlow)

  results = []
  try:
    for name, config in run_configs(args.workdir, args.model).items():
      console_line(f'{name}: {config.model.name} in {epath.Path(args.workdir) / name}')
      results.append(train_one(name, config, args.workdir))
  except train.RUN_ERRORS as e:
    print(f'{PROG}: error: {e}', file=sys.stderr, flush=True)
    return console.exit_without_stuck_threads(1)
  directory = epath.Path(args.workdir)
  (directory / TABLE_FILE).write_text(table(results))
  (directory / CHART_FILE).write_bytes(chart(args.workdir))
  print(table(results))
  console_line(f'wrote {directory / TABLE_FILE} and {directory / CHART_FILE}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
