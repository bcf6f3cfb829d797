"""Benchmarks that print the figures recorded in docs/benchmarks.md (never timed tests).

Not used by training, evaluation, conversion or prediction; `python -m convnext_jax.benchmark
COMMAND` runs them (`cli`), one module per command:

  forward   `forward`: the jitted Flax forward beside PyTorch eager (transformers' ConvNeXt,
            same weights) in one process; float32.
  train, infer
            `step`: the trainer's own run (`run.Run`), its jitted train (or eval) step on
            any backend: img/s, step ms, compile s, TFLOP/s from XLA's cost analysis, MFU,
            memory; beside PyTorch.
  profile   `profile`: the same train step broken down: augmentation, forward, backward and
            update each timed alone, then the step's traced ops grouped by part and layer.
  compile   `compilation`: lowering and compile seconds of forward+backward from abstract
            params, without and with `scan=True`.
  convert   `conversion`: `convnext-convert import` and `export` (official, timm, hf), each
            in a fresh process, with its peak resident memory.
  input     `preprocessing`: training and evaluation preprocessing, tf.data beside a Pillow
            implementation of timm's transforms (`pil_reference`), on one core and on all.
  resume    `resume`: the peak memory of a trainer resuming a workdir whose last step is
            done, above a process that imports the trainer, in train states.

`common` holds what they share (versions line, peak FLOP/s table, `Result`, timer, `--json`
record). Only `input` needs TensorFlow, imported when it runs; `forward` and `convert` need
torch (and transformers for `forward`); the rest need neither. This package module imports
nothing.
"""
