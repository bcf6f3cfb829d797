"""`python -m convnext_jax.benchmark train|infer`: every field printed, and XLA's FLOP count of
the training step about 3x the forward's, the forward's about twice the published
multiply-adds (../shared/reference/convnext.md: convnext_atto 0.55 GMACs at 224).
`benchmark compile`: every field printed and recorded. The peak FLOP/s behind MFU: the vendor
figures of ../shared/reference/performance.md. `--model`: a short help, one error line."""

import argparse
import contextlib
import functools
import io
import json
import re

import jax
import pytest

from convnext_jax import models
from convnext_jax.benchmark import cli
from convnext_jax.benchmark import common
from convnext_jax.benchmark import compilation
from convnext_jax.benchmark import step

SIZE, BATCH = 64, 16
# The flags of the step benchmarks' runs here: one device, one timed step after one warm-up.
# The depthwise conv as XLA's grouped convolution: on CPU it compiles in about half the time of
# the shifted sum 'auto' picks there (docs/benchmarks.md), and the fields are the same.
SMALL_RUN = ('--model', 'convnext_atto', '--batch', str(BATCH), '--size', str(SIZE))
SMALL_RUN += ('--devices', '1', '--warmup', '1', '--iters', '1', '--depthwise-impl', 'conv')
ATTO_GMACS_224 = 0.55


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Both commands on one of the 8 test devices: with data parallelism every device repeats
  the optimizer's update of the replicated weights, which would blur the 3x below."""
  root = tmp_path_factory.mktemp('bench')
  out = {}
  for command in ('train', 'infer'):
    path = root / f'{command}.json'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      cli.main(
          [
              command,
              *SMALL_RUN,
              '--compare',
              'torch',
              '--json',
              str(path),
          ]
      )
    out[command] = json.loads(path.read_text()), printed.getvalue()
  return out


# One line per configuration, in `benchmark forward`'s format, then the step's figures.
LINE = (
    r'  {name} +\d+\.\d img/s +\d+\.\d ms/step  x ?\d+\.\d\d vs torch  compile +{compile} '
    r'+{tflops} TFLOP/s  MFU n/a \(CPU: not meaningful\)  memory {memory}'
)


@pytest.mark.parametrize('command', ['train', 'infer'])
def test_every_field_is_printed(runs, command):
  lines = runs[command][1].splitlines()
  what = 'training step' if command == 'train' else 'forward'
  assert lines[1].startswith(
      f'convnext_atto {what}, batch {BATCH}, {SIZE}x{SIZE}, float32; '
      "cpu x 1, mesh {'data': 1, 'fsdp': 1, 'model': 1}"
  )
  assert re.fullmatch(
      LINE.format(
          name=re.escape(f'jax {command} (float32, depthwise conv)'),
          compile=r'\d+\.\d s',
          tflops=r'\d+\.\d{3}',
          memory=r'\d+ MiB/device \(XLA plan\)',
      ),
      lines[2],
  ), lines[2]
  if command == 'train':  # The same step with the work PyTorch's does not do turned off.
    assert re.fullmatch(
        LINE.format(
            name=re.escape('jax train, work-matched (float32, depthwise conv)'),
            compile=r'\d+\.\d s',
            tflops=r'\d+\.\d{3}',
            memory=r'\d+ MiB/device \(XLA plan\)',
        ),
        lines[3],
    ), lines[3]
  assert re.fullmatch(
      LINE.format(
          name=re.escape(f'torch eager {command} (float32)'),
          compile='n/a',
          tflops='n/a',
          memory='n/a',
      ),
      lines[-1],
  ), lines[-1]


@pytest.mark.parametrize('command', ['train', 'infer'])
def test_lines_and_records(runs, command):
  record = runs[command][0]
  jax_result, *matched, torch_result = record['results']
  assert jax_result['name'] == f'jax {command} (float32, depthwise conv)'
  assert [r['name'] for r in matched] == (
      ['jax train, work-matched (float32, depthwise conv)'] if command == 'train' else []
  )
  assert torch_result['name'] == f'torch eager {command} (float32)'
  assert jax_result['devices'] == 1 and jax_result['batch'] == BATCH
  assert jax_result['compile_s'] > 0 and jax_result['seconds'] > 0
  assert jax_result['mfu'] is None  # A CPU has no peak in the table.
  assert re.fullmatch(r'\d+ MiB/device \(XLA plan\)', jax_result['memory'])
  assert record['device_kind'] == 'cpu'


def test_train_step_flops_are_three_forwards(runs):
  per_image = {c: runs[c][0]['results'][0]['flops'] / BATCH for c in ('train', 'infer')}
  # Forward: the convolutions' 2 FLOPs per multiply-add, plus norms, GELU and the rest (the
  # published 0.55 GMACs are 0.547 rounded).
  published = 2 * ATTO_GMACS_224 * 1e9 * (SIZE / 224) ** 2
  assert 0.99 <= per_image['infer'] / published <= 1.4, per_image
  # Backward about twice the forward; Mixup, AdamW and the EMA add a little.
  assert 0.9 * 3 <= per_image['train'] / per_image['infer'] <= 1.1 * 3, per_image


def test_scanned_steps_count_every_block(runs, tmp_path):
  """XLA's cost analysis counts a while loop's body once: with --scan the FLOPs come from the
  unscanned program, so TFLOP/s and MFU do not drop to a fraction."""
  path = tmp_path / 'scan.json'
  with contextlib.redirect_stdout(io.StringIO()):
    cli.main(
        [
            'infer',
            '--model',
            'convnext_atto',
            '--batch',
            str(BATCH),
            '--size',
            str(SIZE),
            '--devices',
            '1',
            '--warmup',
            '0',
            '--iters',
            '1',
            '--scan',
            '--depthwise-impl',
            'conv',
            '--json',
            str(path),
        ]
    )
  scanned = json.loads(path.read_text())['results'][0]
  assert scanned['name'] == 'jax infer (float32, scan, depthwise conv)'
  unscanned = runs['infer'][0]['results'][0]['flops']
  assert scanned['flops'] == pytest.approx(unscanned, rel=0.02), (scanned['flops'], unscanned)


# Peak dense TFLOP/s per chip (bfloat16, float32), written from the vendor figures in
# ../shared/reference/performance.md ("Peak dense throughput per chip"), keyed by the
# `device_kind` jax reports for each chip. The TPUs list no float32 peak there ('-').
VENDOR_PEAKS = {
    'TPU v4': (275.0, None),
    'TPU v5 lite': (197.0, None),  # TPU v5e.
    'TPU v5': (459.0, None),  # TPU v5p.
    'TPU v6 lite': (918.0, None),  # TPU v6e (Trillium).
    # The reference's names for them.
    'TPU v5e': (197.0, None),
    'TPU v5p': (459.0, None),
    'TPU v6e': (918.0, None),
    'NVIDIA A100-SXM4-40GB': (312.0, 19.5),
    'NVIDIA A100-SXM4-80GB': (312.0, 19.5),
    'NVIDIA H100 80GB HBM3': (989.0, 67.0),  # H100 SXM.
    'NVIDIA H200': (989.0, 67.0),
    # Not in the table: no peak, so no MFU rather than a wrong one.
    'cpu': (None, None),
    'NVIDIA L4': (None, None),
}


@pytest.mark.parametrize('device_kind', VENDOR_PEAKS)
def test_peak_tflops_are_the_vendor_figures(device_kind):
  bf16, fp32 = VENDOR_PEAKS[device_kind]
  assert common.peak_tflops(device_kind, 'bfloat16') == bf16
  assert common.peak_tflops(device_kind, 'float32') == fp32


def test_mfu_by_hand():
  # 3e15 FLOP per step in 1.5 s on 4 H100s in bfloat16: 2000 TFLOP/s of 4 x 989 = 3956,
  # MFU 2000 / 3956 = 0.50556.
  peak = common.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16')
  result = common.Result('x', 8, 1.5, flops=3e15, devices=4, peak_tflops=peak)
  assert result.tflops == pytest.approx(2000.0)
  assert result.mfu == pytest.approx(0.50556, abs=1e-5)
  assert 'MFU  50.6%' in result.line(None, 'gpu')
  # float32 on a TPU has no listed peak: said so rather than guessed.
  peak = common.peak_tflops('TPU v5 lite', 'float32')
  result = common.Result('x', 8, 1.5, flops=3e15, devices=4, peak_tflops=peak)
  assert result.mfu is None and 'MFU n/a (peak unknown)' in result.line(None, 'tpu')


def test_remat_and_scan_flags_show_in_the_result_name():
  parser = argparse.ArgumentParser()
  step.add_arguments(parser)

  def variant(*argv):
    return step._variant(parser.parse_args(argv))  # pylint: disable=protected-access

  assert variant() == 'float32'
  assert variant('--remat') == 'float32, remat=full'
  assert variant('--remat', 'dots_saveable', '--scan', '--dtype', 'bfloat16') == (
      'bfloat16, remat=dots_saveable, scan'
  )
  with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
    parser.parse_args(['--remat', 'dots'])


def test_compile_prints_and_records_every_field(tmp_path, monkeypatch):
  # convnext_atto's name, but one block a stage of 8 channels: compilation is the cost, and
  # the fields are what this test is about.
  tiny = functools.partial(models.create_model, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
  monkeypatch.setattr(models, 'create_model', tiny)
  path = tmp_path / 'compile.json'
  cache_on = jax.config.jax_enable_compilation_cache
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    cli.main(
        [
            'compile',
            '--model',
            'convnext_atto',
            '--size',
            '32',
            '--depthwise-impl',
            'conv',
            '--json',
            str(path),
        ]
    )
  assert jax.config.jax_enable_compilation_cache == cache_on  # Off during the run only.
  lines = printed.getvalue().splitlines()
  assert len(lines) == 3, lines
  assert lines[1] == (
      'forward+backward compile from abstract params (grad of mean '
      'cross-entropy, train=True, drop path 0.1), batch 1, 32x32, float32, '
      'depthwise conv; cpu; unscanned, then scan=True'
  )
  assert re.fullmatch(
      r'  convnext_atto +lower +\d+\.\d\d s  compile +\d+\.\d\d s  \| scan: '
      r'lower +\d+\.\d\d s  compile +\d+\.\d\d s  \| unscanned/scan x +\d+\.\d\d'
      r'  \| XLA plan \d+ MiB, scan \d+ MiB',
      lines[2],
  ), lines[2]
  record = json.loads(path.read_text())
  assert {
      k: record[k] for k in ('command', 'batch', 'size', 'dtype', 'remat', 'depthwise_impl')
  } == {
      'command': 'compile',
      'batch': 1,
      'size': 32,
      'dtype': 'float32',
      'remat': '',
      'depthwise_impl': 'conv',
  }
  (result,) = record['results']
  assert result['model'] == 'convnext_atto'
  for key in (
      'lower_s',
      'compile_s',
      'scan_lower_s',
      'scan_compile_s',
      'memory_mib',
      'scan_memory_mib',
  ):
    assert result[key] > 0, key
  assert result['ratio'] == pytest.approx(
      (result['lower_s'] + result['compile_s'])
      / (result['scan_lower_s'] + result['scan_compile_s'])
  )


@pytest.mark.parametrize('command', ['train', 'infer', 'compile', 'forward', 'convert'])
def test_model_help_says_where_the_names_are_without_listing_them(capsys, command):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, '--help'])
  assert exit_info.value.code == 0
  help_text = capsys.readouterr().out
  assert 'convnext_jax.models.list_models(' in help_text
  # Two examples, not the registry: argparse's `choices` printed all 54 names twice.
  assert 'convnext_tiny or convnextv2_base' in help_text
  for name in ('convnextv2_huge', 'convnext_isotropic_large', 'roadmap_r200_downsample'):
    assert name not in help_text


@pytest.mark.parametrize(
    'argv, refused',
    [
        (['train', '--model', 'convnext_atom'], "'convnext_atom'"),
        (['convert', '--model', 'convnext_atom'], "'convnext_atom'"),
        # forward compares with transformers' ConvNeXt and compile with scan=True: the
        # ConvNeXt zoo only, so a roadmap model is refused there.
        (['forward', '--model', 'roadmap_r50_baseline'], "'roadmap_r50_baseline'"),
        (['compile', '--model', 'convnext_atto,convnext_atom,x'], "'convnext_atom', 'x'"),
    ],
)
def test_unknown_models_are_refused_in_one_line(capsys, argv, refused):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  command = argv[0]
  zoo = command in ('forward', 'compile')
  known = models.list_models('convnext*' if zoo else '*')
  assert capsys.readouterr().err.splitlines()[-1] == (
      f'python -m convnext_jax.benchmark {command}: error: argument --model: not a model '
      f'this command takes: {refused}; choose from: {", ".join(known)}'
  )


def test_compile_takes_a_comma_separated_list():
  parser = argparse.ArgumentParser()
  compilation.add_arguments(parser)
  assert parser.parse_args([]).model == ['convnext_xlarge']
  assert parser.parse_args(['--model', 'convnext_atto, convnextv2_huge,']).model == [
      'convnext_atto',
      'convnextv2_huge',
  ]


def test_profile_attributes_ops_to_their_part_and_layer():
  from convnext_jax.benchmark import profile  # pylint: disable=g-import-not-at-top

  # Op names as jax writes them into the compiled step's metadata.
  step = 'jit(step)/'
  cases = {
      step + 'jvp(augment)/vmap(jit(_where))/select_n': ('augmentation', ''),
      step + 'jvp(ConvNeXt)/stages.0.1/gelu/erf': ('forward', 'gelu'),
      step + 'transpose(jvp(ConvNeXt))/stages.2.4/pwconv1/dot_general': ('backward', 'pwconv1'),
      step
      + 'jvp(ConvNeXt)/stages.0.0/dwconv/cond/branch_0_fun/depthwise_backward/stack': (
          'backward',
          'dwconv',
      ),
      step
      + 'transpose(jvp(ConvNeXt))/downsample_layers.1.1/conv_general_dilated': (
          'backward',
          'downsample',
      ),
      step + 'optimizer/add': ('optimizer+EMA+guard', ''),
      step + 'guard/jit(_where)/select_n': ('optimizer+EMA+guard', ''),
      '': ('unnamed', ''),
  }
  for op_name, (part, layer) in cases.items():
    assert (profile.part_of(op_name), profile.layer_of(op_name)) == (part, layer), op_name


def test_profile_prints_the_parts_and_the_traced_ops(runs):
  del runs  # Compiles the step `benchmark train` compiled: the session's cache has it.
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    cli.main(['profile', *SMALL_RUN, '--top', '40'])
  out = printed.getvalue()
  for row in (
      'on-device augmentation',
      'forward (loss, less augmentation)',
      'backward (the rest of the step)',
      'optimizer+EMA+guard',
      'train step',
  ):
    assert re.search(rf'^  {re.escape(row)} +-?\d+\.\d ms +-?\d+\.\d%$', out, re.M), row
  # Every part of the step shows in the trace, and the depthwise conv in both passes.
  for row in ('forward', 'backward', 'optimizer+EMA+guard', 'augmentation'):
    assert re.search(rf'^  {re.escape(row)} +\d+\.\d ms', out, re.M), row
  for row in ('forward: dwconv', 'backward: dwconv', 'forward: gelu', 'backward: pwconv1'):
    assert re.search(rf'^  {re.escape(row)} +\d+\.\d ms +\d+\.\d% +\d+ events$', out, re.M), row
