"""Work-arounds for tensorflow-datasets releases, kept in one place to drop them later."""

import importlib
import importlib.resources
import importlib.resources.abc  # pylint: disable=unused-import  (`.abc` must be loaded)
import inspect
import sys

from etils import epath
import tensorflow_datasets as tfds


def alias_importlib_resources() -> None:
  """Lets tfds's own builders (`imagenet2012`, `imagenet_v2`, ...) prepare on Python >= 3.9.

  tfds 4.9.10's `DatasetBuilder.code_path` touches the `importlib_resources` backport, which it
  declares only for Python < 3.9 (tensorflow/datasets#11212), so `download_and_prepare` of any
  builder fails with ModuleNotFoundError where the backport is not installed. The standard
  library's `importlib.resources` (Python >= 3.11: with `.abc.Traversable`) is what tfds needs
  from it, and what etils already uses under that name. A no-op when the backport is there.
  """
  try:
    importlib.import_module('importlib_resources')
  except ModuleNotFoundError:
    sys.modules['importlib_resources'] = importlib.resources


alias_importlib_resources()


class SourceFileCodePath:
  """Builder mixin: `code_path` is the module's file, found without `importlib_resources`.

  tfds 4.9.10's `DatasetBuilder.code_path` uses the `importlib_resources` backport for any
  builder outside tfds, but declares it only for Python < 3.9, so preparing such a builder
  fails with ModuleNotFoundError on newer Pythons (tensorflow/datasets#11212). tfds only uses
  the path to look for a checksums file next to the module; for a plain module on disk this
  gives the same path.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))
