"""tfds datasets for ConvNeXt: importing this package registers three builders with tfds.

* `convnext_shapes`: 10 classes of synthetic coloured shapes, built from nothing in seconds;
  the default dataset of the demo and the tests.
* `imagenet22k`: the full ImageNet from its class tars (manual download; Apache Beam for a
  distributed build).
* `class_folder`: a folder of images, root/<split>/<class>/<image>.

All three write the features of tfds `imagenet2012` (`image` as JPEG bytes, `label`,
`file_name`), so the input pipeline reads any of them, or `imagenet2012` and its evaluation
sets, the same way. This package imports TensorFlow; models and conversion do not import it.
"""

import tensorflow_datasets as tfds

from convnext_jax.datasets import image_folder
from convnext_jax.datasets import imagenet22k
from convnext_jax.datasets import shapes

ClassFolder = image_folder.ClassFolder
ConvnextShapes = shapes.ConvnextShapes
Imagenet22k = imagenet22k.Imagenet22k

# Datasets this project trains or evaluates on, and what preparing each one needs.
DATASETS = {
    'convnext_shapes': 'synthetic, built locally in seconds; no download',
    'imagenet2012': 'tfds ImageNet-1k; manual download of ILSVRC2012_img_{train,val}.tar',
    'imagenet22k': 'manual download of fall11_whole.tar (or its class tars); see docs',
    'class_folder': "your images: pass root='/path' (root/train/<class>/<image>)",
    'imagenet_v2': 'tfds ImageNet-V2 evaluation set; downloaded automatically',
    'imagenet2012_real': 'tfds ImageNet ReaL labels; needs ILSVRC2012_img_val.tar (manual)',
}


def builder(name: str, data_dir: str | None = None, **kwargs) -> tfds.core.DatasetBuilder:
  """A tfds builder by name, prepared or ready to prepare.

  Args:
    name: a tfds name, optionally with config and version: 'convnext_shapes',
      'imagenet2012', 'imagenet22k', 'imagenet22k/classes21841_1a2b3c4d',
      'class_folder/flowers_1a2b3c4d', 'imagenet_v2/matched-frequency:3.0.0', ...
    data_dir: where prepared datasets live (local or gs://); None for the tfds default
      (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    **kwargs: builder arguments, e.g. `root=` for class_folder, `class_list=` for
      imagenet22k.

  Returns:
    The builder; `builder.is_prepared()` says whether it still needs `prepare`.
  """
  return tfds.builder(name, data_dir=data_dir, **kwargs)


def prepare(
    name: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    beam_options=None,
    beam_runner=None,
    **kwargs
) -> tfds.core.DatasetBuilder:
  """`builder(...)`, prepared first if it is not yet (a no-op when it is).

  Args:
    name: as for `builder`.
    data_dir: as for `builder`.
    manual_dir: where manually downloaded archives are (imagenet2012, imagenet22k); None
      for `<data_dir>/downloads/manual`.
    beam_options: `apache_beam.options.pipeline_options.PipelineOptions` for builders that
      can build with Apache Beam (imagenet22k: one work item per class tar, e.g. on
      Dataflow); None builds in this process.
    beam_runner: an Apache Beam runner, with or instead of `beam_options`.
    **kwargs: builder arguments, as for `builder`.

  Returns:
    The prepared builder.
  """
  dataset_builder = builder(name, data_dir=data_dir, **kwargs)
  if not dataset_builder.is_prepared():
    dataset_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, beam_options=beam_options, beam_runner=beam_runner
        )
    )
  return dataset_builder


__all__ = [
    'DATASETS',
    'ClassFolder',
    'ConvnextShapes',
    'Imagenet22k',
    'builder',
    'image_folder',
    'imagenet22k',
    'prepare',
    'shapes',
]
