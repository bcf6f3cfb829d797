"""The config loader (`convnext_jax.configs`): a config by shipped name or by path, with args."""

import pathlib

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from convnext_jax import configs

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# The shipped files as the package sees them: the checkout's configs/ under an editable
# install, site-packages under a wheel's.
DEMO = str(configs.DIRECTORY / 'demo.py')


def test_names_are_the_repository_config_files():
  listed = sorted(p.stem for p in REPO_CONFIGS.iterdir() if p.suffix == '.py')
  listed.remove('__init__')
  assert configs.names() == listed
  assert 'demo' in listed and 'convnext_t_in1k' in listed


@pytest.mark.parametrize(
    'argument', ['demo', 'demo.py', 'configs/demo.py', './configs/demo.py', DEMO]
)
def test_find_outside_a_checkout(argument, tmp_path, monkeypatch):
  # From a directory without configs/ (an installed package's user): names and the
  # repository's relative path both reach the shipped file; an existing path is kept.
  monkeypatch.chdir(tmp_path)
  assert configs.find(argument) == DEMO


def test_find_an_existing_file_is_used_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO_CONFIGS.parent)
  assert configs.find('configs/demo.py') == 'configs/demo.py'
  # A file of the user's own wins over the shipped config of the same name.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'demo.py').write_text('')
  assert configs.find('demo.py') == 'demo.py'
  assert configs.find(str(tmp_path / 'demo.py')) == str(tmp_path / 'demo.py')


@pytest.mark.parametrize(
    'argument, hint',
    [
        ('demoo', 'did you mean demo? '),
        ('configs/convnext_t_in1.py', 'did you mean convnext_t_in1k? '),
        ('elsewhere/demo.py', ''),  # Not the repository's path: a mistake, not the shipped file.
        ('zzz', ''),
    ],
)
def test_unknown_config_is_one_line_with_the_shipped_names(argument, hint, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as raised:
    configs.find(argument)
  shipped = ', '.join(configs.names())
  assert str(raised.value) == (
      f'config {argument} not found: it is not a file, nor a config shipped in '
      f'{configs.DIRECTORY}; {hint}give a config file or one of: {shipped}'
  )


def test_args_pass_through(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argument = 'convnext_t_in22k_ft_in1k:init=/x,res=384'
  assert configs.resolve(argument) == str(configs.DIRECTORY / 'convnext_t_in22k_ft_in1k.py') + (
      ':init=/x,res=384'
  )
  config = configs.load(argument)
  assert (config.input.image_size, config.init_from.path) == (384, '/x')
  assert configs.load('convnext_t_in22k_ft_in1k:init=/x').input.image_size == 224
  assert configs.resolve('demo') == DEMO
  # What get_config raises for its user reaches the caller unchanged.
  with pytest.raises(ValueError, match='^fine-tuning needs pre-trained weights'):
    configs.load('convnext_t_in22k_ft_in1k')


# config_flags loads files with importlib's deprecated load_module(); that is its own affair.
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_resolve_gives_config_flags_the_same_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  flag_values(['convnext-train', f'--config={configs.resolve("demo:runlocal")}'])
  from_flags = flag_values.config
  assert from_flags.to_dict() == configs.load('demo:runlocal').to_dict()
  assert from_flags.num_steps == 6  # runlocal applied.


def test_load_refuses_a_file_that_is_not_a_config(tmp_path):
  no_function = tmp_path / 'empty.py'
  no_function.write_text('')
  with pytest.raises(ValueError) as raised:
    configs.load(str(no_function))
  assert (
      str(raised.value) == f'config file {no_function} has no get_config(arg=None) function to call'
  )
  plain_dict = tmp_path / 'plain.py'
  plain_dict.write_text('def get_config(arg=None):\n  return {"seed": 0}\n')
  with pytest.raises(ValueError) as raised:
    configs.load(f'{plain_dict}:runlocal')
  assert str(raised.value) == (
      f'config {plain_dict}:runlocal: get_config() returned dict; it must return an '
      'ml_collections.ConfigDict'
  )
  assert isinstance(configs.load(DEMO), ml_collections.ConfigDict)
