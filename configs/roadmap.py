"""The paper's roadmap (section 2): ResNet-50 -> ConvNeXt-T (and ResNet-200 -> ConvNeXt-B), one
design change per step, each trained with the same recipe.

  python -m convnext_jax.main --config configs/roadmap.py:track=r50,step=gelu \
      --workdir gs://BUCKET/roadmap/r50/gelu
  python -m convnext_jax.roadmap_study --workdir gs://BUCKET/roadmap/r50    # every step + the table

Arguments: track=r50|r200 (default r50), step=<name> (default baseline), mini (the CPU preset
below), runlocal. The model is `roadmap_<track>_<step>` (`convnext_jax/models/roadmap_net.py`).

Recipe (Table 5, ImageNet-1K, 300 epochs at 224 px): AdamW lr 4e-3 at batch 4096, weight
decay 0.05, 20 warmup epochs, RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8, CutMix 1.0, Random
Erasing 0.25, label smoothing 0.1, stochastic depth 0.1 (r50) or 0.5 (r200), layer scale 1e-6
where a block has it, and **no EMA**: the paper turns it off for every roadmap run (it hurts
the BatchNorm steps).

Steps, with the paper's ImageNet-1K top-1 and GFLOPs (multiply-adds at 224 px; Appendix C,
Tables 10 and 11); each step keeps the changes before it (the kernel sizes are alternatives,
7 is kept from 'gelu' on):
  step         change                        r50: top-1 GFLOPs | r200: top-1 GFLOPs
  (original)   ResNet, 90-epoch recipe            76.13  4.09  |       78.20 15.01
  baseline     ResNet (modern recipe)             78.82  4.09  |       81.14 15.01
  stage_ratio  stage ratio                        79.36  4.53  |       81.33 14.52
  patchify     "patchify" stem                    79.51  4.42  |       81.59 14.38
  depthwise    depthwise conv                     78.28  2.35  |       80.54  7.23
  width        increase width                     80.50  5.27  |       81.85 16.76
  inverted     inverted bottleneck                80.64  4.64  |       82.64 15.68
  dw_up        move up depthwise conv             79.92  4.07  |       82.04 14.63
  kernel5      kernel size 5                      80.35  4.10  |       82.32 14.70
  kernel7      kernel size 7                      80.57  4.15  |       82.30 14.81
  kernel9      kernel size 9                      80.57  4.21  |       82.27 14.95
  kernel11     kernel size 11                     80.47  4.29  |       82.18 15.13
  gelu         ReLU -> GELU                       80.62  4.15  |       82.19 14.81
  fewer_act    fewer activations                  81.27  4.15  |       82.71 14.81
  fewer_norm   fewer norms                        81.41  4.15  |       83.17 14.81
  ln           BN -> LN                           81.47  4.15  |       83.35 14.81
  downsample   separate downsampling layers       81.97  4.49  |       83.60 15.35
('ln': Table 10 prints 4.46 GFLOPs, Figure 2 4.2; a norm adds no multiply-adds. 'downsample'
is ConvNeXt-T / ConvNeXt-B.)

`mini`: a CPU-sized version of every step that keeps what the step changes: depths cut to
(1, 1, 2, 1) before 'stage_ratio' and (1, 1, 3, 1) from it (r200: (1, 3, 4, 1) before),
widths divided by 4 (so 'width' still widens 1.5x: 16 -> 24), the built-in `convnext_shapes`
dataset at 32 px, batch 64, a short schedule, light augmentation, no stochastic depth, no
EMA. Trends at that scale are not the paper's (docs/roadmap.md).
"""

from convnext_jax import config_lib
from convnext_jax.models import roadmap_net

DROP_PATH = {'r50': 0.1, 'r200': 0.5}  # Table 5: ConvNeXt-T's and ConvNeXt-B's rates.

# `mini`: the depths each full-size stage layout becomes.
MINI_DEPTHS = {
    (3, 4, 6, 3): (1, 1, 2, 1),
    (3, 3, 9, 3): (1, 1, 3, 1),
    (3, 24, 36, 3): (1, 3, 4, 1),
    (3, 3, 27, 3): (1, 1, 3, 1),
}
MINI_WIDTH_DIVISOR = 4
MINI_EPOCHS = 6.0


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  unknown = sorted(set(args) - {'track', 'step', 'mini', 'runlocal'})
  if unknown:
    raise ValueError(
        f'roadmap config: unknown argument(s) {unknown}; it takes '
        'track=r50|r200, step=<name>, mini and runlocal'
    )
  track = args.get('track') or 'r50'
  if track not in roadmap_net.TRACKS:
    raise ValueError(
        f'roadmap config: unknown track {track!r}; the tracks are {", ".join(roadmap_net.TRACKS)}'
    )
  steps = {step.name: step for step in roadmap_net.TRACKS[track]}
  name = args.get('step') or 'baseline'
  if name not in steps:
    raise ValueError(
        f'roadmap config: unknown step {name!r} of track {track}; the steps are '
        f'{", ".join(steps)}'
    )
  c = config_lib.base()
  c.model.name = roadmap_net.model_name(track, name)
  c.model.drop_path_rate = DROP_PATH[track]
  c.ema.decay = 0.0
  if 'mini' in args:
    mini(c, dict(steps[name].arch))
  return config_lib.finalize(c, arg)


def mini(c, arch) -> None:
  """The CPU preset, in place, for a step whose RoadmapNet attributes are `arch`."""
  c.model.overrides.depths = MINI_DEPTHS[tuple(arch['depths'])]
  c.model.overrides.widths = tuple(w // MINI_WIDTH_DIVISOR for w in arch['widths'])
  # As configs/demo.py (no stochastic depth: a few hundred steps of small models), at 32 px:
  # the stem (either kind) divides by 4 and three stages halve again, to 1x1.
  config_lib.shapes_on_cpu(c, image_size=32)
  c.num_epochs = MINI_EPOCHS
  c.log_every_steps = 100
  c.eval_every_epochs = MINI_EPOCHS  # Once, at the end.
  c.eval_batch_size = 250
  c.checkpoint_every_steps = 200
