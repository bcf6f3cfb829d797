"""The shipped training configs, installed as `convnext_jax.configs`, and their one loader.

Each config is a Python file with `get_config(arg=None)`; `--config` names one as
`name_or_path[:args]`, e.g. `demo`, `demo.py:runlocal`, `configs/demo.py` or `/abs/my.py`.
A path to an existing file is used as given (your own config, or the shipped one in a
checkout); otherwise the name is looked up among the configs shipped with the package, so a
README command (`--config configs/demo.py`) also runs outside a checkout.

  from convnext_jax import configs
  configs.names()                                    # ['convnext_b_in1k', ..., 'roadmap']
  configs.load('convnext_t_in22k_ft_in1k:init=/ckpt,res=384')   # the ConfigDict
  configs.resolve('demo:runlocal')                   # '/.../configs/demo.py:runlocal'
"""

import difflib
import importlib.util
import os
import pathlib

import ml_collections

DIRECTORY = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
  """The shipped configs' names (their file names without `.py`), sorted."""
  return sorted(path.stem for path in DIRECTORY.glob('*.py') if not path.name.startswith('_'))


def find(name_or_path: str) -> str:
  """The config file that `name_or_path` names.

  Args:
    name_or_path: a path to an existing file (used as given), a shipped config's name with
      or without `.py` (`demo`, `demo.py`), or `configs/<name>.py` (the repository's path of
      a shipped config, for README commands run outside a checkout).

  Returns:
    The file's path.

  Raises:
    ValueError: `name_or_path` is neither an existing file nor a shipped config.
  """
  if os.path.isfile(name_or_path):
    return name_or_path
  shipped = names()
  name = name_or_path.removesuffix('.py')
  # Only the repository's own relative path falls back to the shipped file: another
  # directory's missing config is a mistake to report, not to replace.
  in_repository = os.path.normpath(name_or_path).split(os.sep)
  if len(in_repository) == 2 and in_repository[0] == 'configs' and name_or_path.endswith('.py'):
    name = in_repository[1].removesuffix('.py')
  if name in shipped:
    return str(DIRECTORY / f'{name}.py')
  close = difflib.get_close_matches(name, shipped, n=1)
  hint = f'did you mean {close[0]}? ' if close else ''
  raise ValueError(
      f'config {name_or_path} not found: it is not a file, nor a config shipped in '
      f'{DIRECTORY}; {hint}give a config file or one of: {", ".join(shipped)}'
  )


def resolve(argument: str) -> str:
  """'name_or_path[:args]' -> 'path[:args]', what `config_flags.DEFINE_config_file` takes.

  Raises:
    ValueError: the config is not found (see `find`).
  """
  name_or_path, colon, args = argument.partition(':')
  return find(name_or_path) + colon + args


def load(argument: str) -> ml_collections.ConfigDict:
  """The ConfigDict that the config's `get_config(args)` returns, for 'name_or_path[:args]'.

  The file is loaded as ml_collections' `config_flags` loads it (a module from the file's
  location, not an import), so a config outside any package loads the same way.

  Raises:
    ValueError: the config is not found, has no `get_config`, or its `get_config` returns
      something other than a ConfigDict. What `get_config` itself raises (a ValueError for a
      missing argument such as `init=PATH`) propagates.
  """
  path, *args = resolve(argument).split(':', 1)
  spec = importlib.util.spec_from_file_location('convnext_jax_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'config file {path} has no get_config(arg=None) function to call')
  config = module.get_config(*args)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(
        f'config {argument}: get_config() returned {type(config).__name__}; it must return '
        'an ml_collections.ConfigDict'
    )
  return config
