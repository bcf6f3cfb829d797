"""The roadmap study: every step of the paper's ResNet -> ConvNeXt roadmap trained in turn, then
a table and a chart of our results beside the paper's.

  python -m convnext_jax.roadmap_study --workdir DIR [--track r50|r200] [--steps a,b,...] [--mini]
      [--config configs/roadmap.py[:args]] [--config.<field>=value ...]

Each step trains in `DIR/<step>` with `configs/roadmap.py:track=T,step=S` (`,mini` with
`--mini`; any arguments given after the --config file are passed on), every `--config.*`
override applied to every step, through `train.train_and_evaluate`, as `convnext_jax.main`
trains one config. A step that was interrupted resumes from its checkpoints. A finished step
has `DIR/<step>/roadmap_result.json` (top-1, img/s, parameters, multiply-adds, wall time, the
config), written once its last checkpoint is, and is skipped. Then `DIR/roadmap.md` (every
finished step of the track: parameters, multiply-adds at the trained resolution, top-1 of the
raw weights, training img/s, with the paper's top-1 and GFLOPs at 224 px beside them) and
`DIR/roadmap.png` (horizontal bars in the style of the paper's Figure 2, the paper's beside
ours) are written.

`--mini` is the CPU preset of configs/roadmap.py (small widths and depths, the built-in
`convnext_shapes` dataset at 32 px): the whole r50 track in well under 40 minutes on a
2-core CPU. Trends at that scale are not the paper's (docs/roadmap.md).

Flags and errors as in `convnext_jax.main` (`--verbose`, `--jax_distributed`, ...): a mistake
in the flags, the steps or any step's config is one line on stderr with exit status 2 before
anything trains; a step that cannot go on (`train.RUN_ERRORS`) ends the study with one line
and exit status 1. A step stopped by SIGTERM ends the study after its checkpoint (exit 0);
the same command resumes it.
"""

import dataclasses
import functools
import io
import json
import os
import re
import statistics
import sys
import time
from typing import Any

# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_path
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from convnext_jax import checkpoints
from convnext_jax import config_lib
from convnext_jax import configs
from convnext_jax import console
from convnext_jax import fileio
from convnext_jax import host_malloc

# Imported first: it sets TensorFlow's log level, loads TensorFlow without its start-up
# notices, and defines the flags this command shares with it (--config, --workdir, ...).
from convnext_jax import main as cli
from convnext_jax import models
from convnext_jax import multihost
from convnext_jax import run as run_lib
from convnext_jax import train
from convnext_jax import validation
from convnext_jax.data import inputs as inputs_lib
from convnext_jax.models import roadmap_net

PROG = 'convnext_jax.roadmap_study'
USAGE = (
    'python -m convnext_jax.roadmap_study --workdir DIR [--track r50|r200] [--steps a,b,...] '
    '[--mini]'
)
DEFAULT_CONFIG = 'roadmap'  # The shipped configs/roadmap.py (`configs.find`).
RESULT_FILE = 'roadmap_result.json'
TABLE_FILE = 'roadmap.md'
CHART_FILE = 'roadmap.png'

TRACK_TITLES = {'r50': 'ResNet-50 -> ConvNeXt-T', 'r200': 'ResNet-200 -> ConvNeXt-B'}
# Figure 2's groups of steps.
GROUPS = (
    ('ResNet', ('baseline',)),
    ('macro design', ('stage_ratio', 'patchify')),
    ('ResNeXt', ('depthwise', 'width')),
    ('inverted bottleneck', ('inverted',)),
    ('large kernel', ('dw_up', 'kernel5', 'kernel7', 'kernel9', 'kernel11')),
    ('micro design', ('gelu', 'fewer_act', 'fewer_norm', 'ln', 'downsample')),
)
# Kernel sizes the paper tried and did not keep (it goes on from 7): lighter bars.
NOT_KEPT = ('kernel5', 'kernel9', 'kernel11')

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    'track',
    'r50',
    list(roadmap_net.TRACKS),
    'r50: ResNet-50 -> ConvNeXt-T; r200: ResNet-200 -> ConvNeXt-B.',
)
flags.DEFINE_list(
    'steps', None, 'Steps to train, e.g. baseline,downsample (default: every step of the track).'
)
flags.DEFINE_bool(
    'mini',
    False,
    "configs/roadmap.py's CPU preset: small models on the built-in dataset at 32 px.",
)


def select_steps(track: str, names: list[str] | None) -> list[roadmap_net.Step]:
  """The steps of `track` named in `names` (all when None), in roadmap order.

  Raises:
    ValueError: a name that is not a step of the track (the message lists them).
  """
  steps = roadmap_net.TRACKS[track]
  if not names:
    return list(steps)
  known = [step.name for step in steps]
  unknown = [name for name in names if name not in known]
  if unknown:
    raise ValueError(
        f'--steps: unknown step(s) {", ".join(unknown)} of track {track}; the '
        f'steps are {",".join(known)}'
    )
  return [step for step in steps if step.name in names]


def step_configs(
    config_argument: str,
    overrides: dict[str, Any],
    track: str,
    steps: list[roadmap_net.Step],
    mini: bool,
    with_mesh: bool = False,
) -> dict[str, ml_collections.ConfigDict]:
  """Each step's config: the config file with its arguments, the track, the step (and
  `mini`), then the command line's `--config.*` overrides; each checked (`validation`), so
  that a mistake in the last step does not wait for the others to be trained. Each step's
  trainer checks its config again when it starts: the study checks every step before any.

  Args:
    config_argument: the --config value, 'file.py[:args]'.
    overrides: the --config.* values, by dotted key (ml_collections' override values).
    track, steps, mini: what the study trains.
    with_mesh: also check each config against its mesh (once every device is visible).

  Raises:
    ValueError: an argument or override the study cannot take, or a config file that does
      not load; `validation.ConfigError` (a ValueError) for a config that fails a check.
  """
  path, _, arg = config_argument.partition(':')
  user_args = [part.strip() for part in arg.split(',') if part.strip()]
  clash = sorted(set(config_lib.parse_arg(arg)) & {'track', 'step'})
  if clash:
    raise ValueError(
        f'--config={config_argument}: the study sets the track and the step '
        f'itself ({",".join(clash)}= given); choose them with --track and --steps'
    )
  if 'model.name' in overrides:
    raise ValueError(
        "--config.model.name: the study sets each step's model; choose the steps with --steps"
    )
  if mini and 'mini' not in user_args:
    user_args.append('mini')
  out = {}
  for step in steps:
    args = ','.join([f'track={track}', f'step={step.name}', *user_args])
    config = configs.load(f'{path}:{args}')
    for key, value in overrides.items():
      config_path.set_value(key, config, value)
    validation.check(config, validation.config_mesh(config) if with_mesh else None)
    out[step.name] = config
  return out


@dataclasses.dataclass(frozen=True)
class Study:
  """What one invocation trains: the track, its root workdir and the preset's name."""

  track: str
  workdir: str
  preset: str  # 'mini' or '' (full size).

  def step_dir(self, step: str) -> epath.Path:
    return epath.Path(self.workdir) / step


def run_step(
    study: Study, step: roadmap_net.Step, config: ml_collections.ConfigDict, position: str
) -> bool:
  """Trains (or resumes, or skips) one step; process 0 writes its result.

  Returns:
    Whether the step is finished; False when training stopped before its last step
    (SIGTERM), where the study ends.

  Raises:
    train.RUN_ERRORS: the step cannot go on; or the step's directory holds another model.
  """
  step_dir = study.step_dir(step.name)
  result_path = step_dir / RESULT_FILE
  finished = (
      multihost.decide_on_process_0(
          f'roadmap {step.name} finished', lambda: str(int(result_path.exists()))
      )
      == '1'
  )
  if finished:
    result = json.loads(result_path.read_text())
    _check_same_run(result, config, step_dir)
    _say(f'{position} {step.name}: finished before ({_one_result(result)}), skipping')
    return True
  workdir = os.fspath(step_dir)
  before = checkpoints.workdir_steps(workdir)
  _say(
      f'{position} {step.name} ({step.title}): '
      f'{"resuming" if before else "training"} {config.model.name} in {workdir}'
  )
  start = time.perf_counter()
  with fileio.quiet_write_error_echoes():
    last_eval = train.train_and_evaluate(config, workdir)
  wall_s = time.perf_counter() - start
  facts = inputs_lib.Inputs(config).facts
  num_classes = config.model.num_classes if config.model.num_classes > 0 else facts.num_classes
  total = run_lib.schedule(config, facts.num_train_examples).total_steps
  saved = checkpoints.workdir_steps(workdir)
  if not saved or saved[-1] < total:
    _say(
        f'{step.name}: stopped at step {saved[-1] if saved else 0} of {total}; run the same '
        'command again to resume'
    )
    return False
  if jax.process_index() == 0:
    metrics = last_eval or checkpoints.load_params(workdir, 'raw')[1]['metrics']
    result = _measure(study, step, config, num_classes, metrics, workdir)
    result.update(train_steps=total, wall_s=wall_s, resumed_from_step=before[-1] if before else 0)
    _write_atomically(result_path, json.dumps(result, indent=1).encode())
    _say(f'{position} {step.name}: {_one_result(result)}')
  multihost.barrier(f'roadmap {step.name} result written')
  return True


def _check_same_run(
    result: dict[str, Any], config: ml_collections.ConfigDict, step_dir: epath.Path
) -> None:
  """Refuses a result of another model; warns about one trained with another config."""
  if result['model_name'] != config.model.name:
    raise train.TrainingError(
        f'{step_dir} holds a {result["model_name"]} run, not '
        f'{config.model.name}; use one --workdir per track and preset'
    )
  ours, theirs = _flat(_config_json(config)), _flat(result.get('config', {}))
  differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
  if differ:
    logging.warning(
        '%s was trained with another config (%s differ); its result is kept: '
        'delete the directory to train the step again',
        step_dir,
        ', '.join(differ[:6]) + (', ...' if len(differ) > 6 else ''),
    )


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _measure(
    study: Study,
    step: roadmap_net.Step,
    config: ml_collections.ConfigDict,
    num_classes: int,
    metrics: dict[str, float],
    workdir: str,
) -> dict[str, Any]:
  """A finished step's result: accuracy, throughput, size and multiply-adds, the paper's."""
  model = run_lib.model_from_config(config, num_classes)
  size = config.input.image_size
  evaluation = config.dataset.name.split('/')[0]
  if config.dataset.extra_eval:  # The trainer's name for the main set among several.
    evaluation += f'_{config.dataset.eval_split}'
  return {
      'track': study.track,
      'step': step.name,
      'title': step.title,
      'model_name': config.model.name,
      'preset': study.preset,
      'dataset': config.dataset.name,
      'image_size': size,
      'num_classes': num_classes,
      'params': models.count_params(models.param_shapes(model, size)),
      # count_macs needs the depthwise convs as convolutions, not the CPU's shifted sums.
      'macs': models.count_macs(model.clone(depthwise_impl='conv'), size),
      'top1': metrics[f'{evaluation}/raw/top1'],
      'top5': metrics.get(f'{evaluation}/raw/top5'),
      'images_per_sec': images_per_sec(workdir),
      'global_batch_size': config.global_batch_size,
      'paper_top1': step.paper_top1,
      'paper_gflops': step.paper_gflops,
      'config': _config_json(config),
  }


def images_per_sec(workdir: str) -> float | None:
  """The median of the `train/images_per_sec` the trainer wrote to `workdir`'s TensorBoard
  events (one value per log window, evaluation and checkpoint waits excluded), or None."""
  events = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  events.Reload()
  if 'train/images_per_sec' not in events.Tags()['tensors']:
    return None
  return statistics.median(
      float(tensor_util.make_ndarray(e.tensor_proto))
      for e in events.Tensors('train/images_per_sec')
  )


def _write_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `path` whole or not at all (`fileio.atomic_output`: local or remote)."""
  with fileio.atomic_output(os.fspath(path), overwrite=True) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def _say(text: str) -> None:
  """A line of the study's own progress, on process 0's stdout."""
  if jax.process_index() == 0:
    logging.flush()
    print(text, flush=True)


def _one_result(result: dict[str, Any]) -> str:
  return (
      f'top-1 {100 * result["top1"]:.1f}% (paper {result["paper_top1"]:.2f}%), '
      f'{_img_per_sec(result)} img/s, {result["params"]:,} params, '
      f'{_gmacs(result["macs"] / 1e9)} GMACs at {result["image_size"]} px, done in '
      f'{console.duration(result["wall_s"])}'
  )


def _gmacs(value: float) -> str:
  return f'{value:.2f}' if value >= 0.995 else f'{value:.3g}'


def _macs_short(macs: int) -> str:
  """'4.15G', or '2.61M' for the mini models."""
  return f'{macs / 1e9:.2f}G' if macs >= 1e8 else f'{macs / 1e6:.3g}M'


def _img_per_sec(result: dict[str, Any]) -> str:
  value = result.get('images_per_sec')
  return '-' if value is None else f'{value:.0f}'


def finished_results(study: Study) -> list[dict[str, Any]]:
  """The results of every finished step of the study's track, in roadmap order."""
  results = []
  for step in roadmap_net.TRACKS[study.track]:
    path = study.step_dir(step.name) / RESULT_FILE
    if path.exists():
      results.append(json.loads(path.read_text()))
  return results


def table(track: str, results: list[dict[str, Any]]) -> str:
  """The study's results as Markdown: ours beside the paper's, one row per finished step."""
  order = [step.name for step in roadmap_net.TRACKS[track]]
  total = len(order)
  sizes = sorted({r['image_size'] for r in results})
  data = sorted({r['dataset'] for r in results})
  lines = [
      f'# Roadmap study, track {track}: {TRACK_TITLES[track]}',
      '',
      f'{len(results)} of {total} steps, trained on {", ".join(data)} at '
      f'{", ".join(map(str, sizes))} px. The paper\'s numbers: ImageNet-1K, 300 epochs, '
      "224 px, EMA off (Appendix C). GMACs: multiply-adds of one image's forward pass "
      '(what the paper calls FLOPs), ours at the trained resolution. Top-1 ours: the raw '
      'weights (no EMA) at the end of training. img/s: training throughput, the median '
      "of the logged windows (evaluation excluded). Time: the step's wall time, "
      'compilation and evaluation included.',
      '',
  ]
  if any(r['preset'] == 'mini' for r in results):
    lines += [
        'Mini preset (configs/roadmap.py:mini): reduced widths and depths, the built-in '
        'convnext_shapes dataset, a short schedule. Trends at this scale are not the '
        "paper's.",
        '',
    ]
  lines += [
      '| # | step | change | params | GMACs ours (px) | GFLOPs paper (224 px) | '
      'top-1 ours (%) | top-1 paper (%) | img/s | time |',
      '|---|---|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  resumed = False
  for r in results:
    mark = '*' if r.get('resumed_from_step') else ''
    resumed = resumed or bool(mark)
    lines.append(
        f'| {order.index(r["step"]) + 1} | {r["step"]} | {r["title"]} | '
        f'{r["params"]:,} | {_gmacs(r["macs"] / 1e9)} ({r["image_size"]}) | '
        f'{r["paper_gflops"]:.2f} | {100 * r["top1"]:.2f} | {r["paper_top1"]:.2f} | '
        f'{_img_per_sec(r)} | {console.duration(r["wall_s"])}{mark} |'
    )
  top1, gflops = roadmap_net.ORIGINAL_RECIPE[track]
  lines += [
      '',
      f'Paper, the ResNet with the original 90-epoch recipe: top-1 {top1:.2f}, '
      f'{gflops:.2f} GFLOPs.',
  ]
  if resumed:
    lines.append('*: resumed; the time is that of the last part only.')
  return '\n'.join(lines) + '\n'


def chart(track: str, results: list[dict[str, Any]]) -> bytes:
  """A PNG in the style of the paper's Figure 2: one horizontal bar per step, top-1 on the x
  axis and GFLOPs written beside each bar; the paper's panel beside ours (each on its own
  scale: the datasets differ)."""
  # Imported here, and drawn on an Agg canvas without pyplot: no global backend state.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top

  names = [r['step'] for r in results]
  labels = [r['title'] for r in results]
  rows = range(len(results))
  fig = figure.Figure(figsize=(11, 1.6 + 0.34 * len(results)), dpi=110, layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  paper_ax, ours_ax = fig.subplots(1, 2, sharey=True)
  panels = (
      (
          paper_ax,
          [r['paper_top1'] for r in results],
          [f'{r["paper_top1"]:.2f}  {r["paper_gflops"]:.2f}G' for r in results],
          ('#7f7f7f', '#c7c7c7'),
          'Paper: ImageNet-1K, 224 px (GFLOPs at 224 px)',
      ),
      (
          ours_ax,
          [100 * r['top1'] for r in results],
          [f'{100 * r["top1"]:.1f}  {_macs_short(r["macs"])}' for r in results],
          ('#1f77b4', '#aec7e8'),
          f'Ours: {", ".join(sorted({r["dataset"] for r in results}))}, '
          f'{", ".join(sorted({str(r["image_size"]) for r in results}))} px'
          f'{" (mini)" if any(r["preset"] == "mini" for r in results) else ""} '
          '(GMACs at that size)',
      ),
  )
  for ax, values, notes, (kept, tried), title in panels:
    low, high = min(values), max(values)
    span = max(high - low, 1.0)
    left = low - 0.35 * span
    colors = [tried if name in NOT_KEPT else kept for name in names]
    ax.barh(list(rows), [v - left for v in values], left=left, height=0.62, color=colors, zorder=2)
    for row, value, note in zip(rows, values, notes):
      ax.text(value + 0.02 * span, row, note, va='center', fontsize=8, zorder=3)
    ax.set_xlim(left, high + 0.45 * span)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('top-1 accuracy (%)')
    ax.grid(axis='x', color='#e5e5e5', zorder=0)
    _shade_groups(ax, names)
  paper_ax.set_yticks(list(rows), labels=labels, fontsize=9)
  paper_ax.set_ylim(len(results) - 0.5, -0.5)  # The first step on top, as in Figure 2.
  for group, members in GROUPS:
    shown = [i for i, name in enumerate(names) if name in members]
    if shown:
      ours_ax.text(
          1.02,
          (shown[0] + shown[-1]) / 2,
          group,
          va='center',
          fontsize=8,
          style='italic',
          transform=ours_ax.get_yaxis_transform(),
      )
  fig.suptitle(
      f'Roadmap {track}: {TRACK_TITLES[track]} (lighter: kernel sizes not kept)', fontsize=11
  )
  out = io.BytesIO()
  fig.savefig(out, format='png', bbox_inches='tight')
  return out.getvalue()


def _shade_groups(ax, names: list[str]) -> None:
  """Alternating bands behind the steps of each of Figure 2's groups."""
  for k, (_, members) in enumerate(GROUPS):
    shown = [i for i, name in enumerate(names) if name in members]
    if shown and k % 2:
      ax.axhspan(shown[0] - 0.5, shown[-1] + 0.5, color='#f3f3f3', zorder=0)


def write_report(study: Study) -> list[str]:
  """Writes the table and the chart of every finished step; returns the paths written."""
  results = finished_results(study)
  if not results:
    return []
  root = epath.Path(study.workdir)
  markdown = table(study.track, results)
  _write_atomically(root / TABLE_FILE, markdown.encode())
  _write_atomically(root / CHART_FILE, chart(study.track, results))
  print(markdown, flush=True)
  return [os.fspath(root / TABLE_FILE), os.fspath(root / CHART_FILE)]


def main(argv):
  report = functools.partial(cli.report, prog=PROG)
  if len(argv) > 1:
    return report(f'unexpected arguments {argv[1:]}; flags take the form --name=value', 2)
  host_malloc.configure()  # Before the backend starts its threads.
  console.configure(FLAGS.verbose)
  preset = 'mini' if FLAGS.mini else ''
  config_argument = config_flags.get_config_filename(FLAGS['config'])
  if 'mini' in config_lib.parse_arg(config_argument.partition(':')[2]):
    preset = 'mini'
  cli.initialize_distributed()
  try:
    steps = select_steps(FLAGS.track, FLAGS.steps)
    configs_by_step = step_configs(
        config_argument,
        config_flags.get_override_values(FLAGS['config']),
        FLAGS.track,
        steps,
        FLAGS.mini,
        with_mesh=True,
    )
  except ValueError as e:
    return report(e, 2)
  study = Study(FLAGS.track, FLAGS.workdir, preset)
  epath.Path(study.workdir).mkdir(parents=True, exist_ok=True)
  _say(
      f'roadmap {study.track} ({TRACK_TITLES[study.track]}){" mini" if preset else ""}: '
      f'{len(steps)} step(s) in {study.workdir}: {", ".join(s.name for s in steps)}'
  )
  for i, step in enumerate(steps, start=1):
    try:
      finished = run_step(study, step, configs_by_step[step.name], f'[{i}/{len(steps)}]')
    except train.RUN_ERRORS as e:
      return cli.fail(f'step {step.name}: {e}', PROG)
    if not finished:
      return 0
  if jax.process_index() == 0:
    written = write_report(study)
    if written:
      _say(f'wrote {" and ".join(written)}')
  return 0


def _has_config_flag(argv: list[str]) -> bool:
  return any(re.fullmatch(r'--?config(=.*)?', arg) for arg in argv[1:])


def run():
  """`python -m convnext_jax.roadmap_study`: the default config is configs/roadmap.py."""
  argv = list(sys.argv)
  if not _has_config_flag(argv):
    # Given explicitly, so that a mistake in an override is reported as for any config.
    argv.insert(1, f'--config={DEFAULT_CONFIG}')
  app.run(main, argv=argv, flags_parser=functools.partial(cli.parse_flags, prog=PROG, usage=USAGE))


if __name__ == '__main__':
  run()
