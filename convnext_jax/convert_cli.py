"""`convnext-convert` (or `python -m convnext_jax.convert_cli`): ConvNeXt and ResNet weights
between PyTorch files and orbax params checkpoints; `convnext_jax.convert` converts, and
`convnext_jax.checkpoints` reads and writes the orbax side.

  convnext-convert import SRC DEST [--model NAME] [--ema] [--overwrite]
      SRC: official .pth ({'model': ...} / {'model_ema': ...}), timm .safetensors/.pth/.bin,
      torchvision .pth, a Hugging Face model directory (ConvNeXt, ConvNeXt V2, ResNet), or
      ConvNeXt-V2's FCMAE weights (a released `..._fcmae.pt` encoder, or a checkpoint of the
      official pre-training code, decoder included).
      DEST: an orbax params checkpoint directory. The model is detected, except for the
      roadmap steps that are neither a ResNet nor ConvNeXt: name those with --model.
  convnext-convert export SRC DEST [--layout official|timm|hf|fcmae|fcmae_training]
                                   [--params ema|raw] [--step N] [--overwrite]
      SRC: an orbax params checkpoint, or a training workdir (its EMA or raw weights, at the
      latest or a given step; with BatchNorm's running statistics). DEST: .pth (official;
      torchvision for ResNets), .safetensors (timm) or a directory (Hugging Face); --layout
      overrides the guess from DEST's suffix. An FCMAE model is written as the released
      encoder (fcmae), or with --layout fcmae_training as the official pre-training code's
      checkpoint ({'model': ...}, decoder included; the official code starts from it), or
      with --layout timm or hf as the V2 backbone it pre-trains, no head (timm's
      convnextv2_<size> with num_classes=0, transformers' ConvNextV2Model).
  convnext-convert inspect SRC
      Prints what SRC holds: layout, model, classes, parameter count (BatchNorm statistics
      not counted).

Errors are one line on stderr with exit status 1, a full disk included (bad flags are
argparse's usage errors, status 2); nothing is written unless conversion succeeded (outputs
go to a temporary path and are renamed into place).
"""

import argparse
import sys
import time

from convnext_jax import checkpoints
from convnext_jax import fileio
from convnext_jax import models
from convnext_jax.convert import files
from convnext_jax.convert import layouts

PROG = 'convnext-convert'
# The state-dict entries of a PyTorch BatchNorm that are not parameters.
_BATCHNORM_BUFFERS = ('.running_mean', '.running_var', '.num_batches_tracked')


def _guess_layout(dest: str) -> str:
  if dest.endswith(files.PICKLE_SUFFIXES):
    return 'official'
  if dest.endswith(files.SAFETENSORS_SUFFIX):
    return 'timm'
  return 'hf'


def run_import(args) -> str:
  state_dict, info = files.load_torch_checkpoint(args.src, ema=args.ema)
  try:
    layout = layouts.detect_layout(layouts.strip_wrapper_prefix(state_dict))
    model_name, params = layouts.torch_to_flax(state_dict, model_name=args.model, consume=True)
  except layouts.ConversionError as e:
    raise layouts.ConversionError(f'{args.src}: {e}') from None
  del state_dict
  num_classes = layouts.num_classes_of(params)
  metadata = {
      'model_name': model_name,
      'num_classes': num_classes,
      'class_names': info['class_names'],
      'source': info['source'],
      'source_layout': layout,
      'ema': info['ema'],
  }
  checkpoints.save_params(args.dest, params, metadata, overwrite=args.overwrite)
  weights = 'EMA' if info['ema'] else 'raw'
  return (
      f'wrote {args.dest}: {model_name}, {num_classes} classes, {weights} weights '
      f'from {layout} {args.src}'
  )


def run_export(args) -> str:
  params, metadata = checkpoints.load_params(args.src, which=args.params, step=args.step)
  model_name = metadata['model_name']
  spec = models.get_spec(model_name)
  layout = args.layout or _guess_layout(args.dest)
  if not args.layout and spec.masked_autoencoder:
    layout = 'fcmae'  # The released encoder's form, unless asked for the training one.
  num_classes = layouts.num_classes_of(params)
  state_dict = layouts.flax_to_torch(params, model_name, layout)
  del params
  # An FCMAE encoder in timm's or transformers' layout is its backbone's weights
  # (`layouts.encoder_as_backbone`).
  as_backbone = spec.masked_autoencoder and layout in layouts.BACKBONE_EXPORT_LAYOUTS
  written = spec.backbone if as_backbone else model_name
  if layout in ('official',) + layouts.FCMAE_LAYOUTS:
    files.save_official_pth(state_dict, args.dest, overwrite=args.overwrite)
  elif layout == 'timm':
    files.save_safetensors(state_dict, args.dest, overwrite=args.overwrite)
  else:
    files.save_hf_directory(
        state_dict,
        args.dest,
        written,
        num_classes,
        metadata.get('class_names'),
        overwrite=args.overwrite,
    )
  weights = (
      f", {metadata['weights']} weights of step {metadata['step']}" if 'step' in metadata else ''
  )
  if as_backbone:
    what = f"{model_name}'s encoder as {written} without a head (final norm at identity)"
  else:
    what = f'{model_name}, {num_classes} classes'
  return f'wrote {args.dest}: {what}, {layout} layout{weights}'


def run_inspect(args) -> str:
  if checkpoints.is_params_checkpoint(args.src):
    weights, metadata = checkpoints.load_params(args.src)
    facts = dict(metadata, parameters=models.count_params(models.split_batch_stats(weights)[0]))
  else:
    state_dict, info = files.load_torch_checkpoint(args.src, ema=args.ema)
    state_dict = layouts.strip_wrapper_prefix(state_dict)
    try:
      layout = layouts.detect_layout(state_dict)
      model_name, num_classes = layouts.detect_model(state_dict, layout)
    except layouts.ConversionError as e:
      raise layouts.ConversionError(f'{args.src}: {e}') from None
    params = {k: v for k, v in state_dict.items() if not k.endswith(_BATCHNORM_BUFFERS)}
    facts = dict(
        layout=layout,
        model_name=model_name,
        num_classes=num_classes,
        ema=info['ema'],
        parameters=models.count_params(params),
    )
  return '\n'.join(f'{k}: {v}' for k, v in facts.items() if k != 'class_names')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description='Convert ConvNeXt and ResNet weights between PyTorch and JAX/Flax.'
  )
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('import', help='PyTorch file or HF directory -> orbax params checkpoint')
  p.add_argument('src', help='.pth/.bin/.safetensors file or Hugging Face model directory')
  p.add_argument('dest', help='orbax checkpoint directory to create')
  p.add_argument(
      '--model',
      choices=models.list_models(),
      metavar='NAME',
      help='expected model name (default: detected from the weights)',
  )
  p.add_argument(
      '--ema', action='store_true', help="take 'model_ema' from an official training checkpoint"
  )
  p.add_argument('--overwrite', action='store_true', help='replace DEST if it exists')
  p.set_defaults(run=run_import)

  p = sub.add_parser('export', help='orbax params checkpoint -> PyTorch file or HF directory')
  p.add_argument('src', help='orbax params checkpoint, or training workdir')
  p.add_argument('dest', help='.pth (official), .safetensors (timm) or directory (hf)')
  p.add_argument(
      '--params',
      choices=('ema', 'raw'),
      default='ema',
      help='weights of a training workdir (default: ema, else raw)',
  )
  p.add_argument(
      '--step',
      type=int,
      default=None,
      help='checkpoint step of a training workdir (default: the latest)',
  )
  p.add_argument(
      '--layout',
      choices=layouts.ALL_LAYOUTS,
      help='output key layout (default: from the suffix of DEST; fcmae for FCMAE models); '
      'roadmap steps other than the ResNets and ConvNeXt have only official; FCMAE models '
      'fcmae (the released encoder), fcmae_training (the official pre-training '
      "checkpoint's, with the decoder), timm and hf (the encoder as the V2 backbone)",
  )
  p.add_argument('--overwrite', action='store_true', help='replace DEST if it exists')
  p.set_defaults(run=run_export)

  p = sub.add_parser('inspect', help='describe a checkpoint')
  p.add_argument('src', help='PyTorch file, HF directory or orbax params checkpoint')
  p.add_argument('--ema', action='store_true', help="describe 'model_ema' of a .pth")
  p.set_defaults(run=run_inspect)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  try:
    with fileio.quiet_write_error_echoes():
      message = args.run(args)
  except (layouts.ConversionError, checkpoints.CheckpointError, OSError) as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 1
  if args.command == 'inspect':
    print(message)
  else:
    print(f'{message} ({time.perf_counter() - start:.1f} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
