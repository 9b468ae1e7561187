"""Config errors name their key and come before anything compiles."""

import subprocess
import sys

import pytest

from xmodal import config as config_lib

SHAPES = 'configs/shapes.py'


@pytest.mark.parametrize('override, key', [
    ('model.vision.widht=64', 'model.vision.widht'),
    ('optim.lr=fast', 'optim.lr'),
    ('model.text.width=130', 'model.text.width'),
    ('model.image_size=60', 'model.image_size'),
    ('model.attention=flash', 'model.attention'),
    ('model.fusion_word_window=24', 'model.fusion_word_window'),
    ('nosuchsection.x=1', 'nosuchsection'),
])
def test_bad_override_names_the_key(override, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')):
    config_lib.load(SHAPES, [override])


def test_data_follows_the_model_shapes_under_either_name():
  for override in ('data.image_size=32', 'model.image_size=32'):
    config = config_lib.load(SHAPES, [override, 'model.vision.patch_size=8'])
    assert config.data.image_size == config.model.image_size == 32, override
  config = config_lib.load(SHAPES, ['data.max_text_len=20'])
  assert config.model.max_text_len == 20


def test_a_data_section_set_apart_from_the_model_must_agree_with_it():
  from xmodal.config.data import data_config
  config = config_lib.load(SHAPES)
  config.data = data_config(image_size=32, max_text_len=config.model.max_text_len)
  with pytest.raises(config_lib.ConfigError, match=r'data\.image_size'):
    config_lib.validate(config)


def test_model_size_is_chosen_by_the_config_argument_not_an_override():
  with pytest.raises(config_lib.ConfigError, match=r"'model\.size'"):
    config_lib.load(SHAPES, ['model.size=base'])


def test_unknown_config_argument_lists_the_valid_ones():
  with pytest.raises(config_lib.ConfigError, match="'sise'.*valid: \\['size', 'steps'\\]"):
    config_lib.load(SHAPES + ':sise=tiny')


def test_overrides_are_typed():
  config = config_lib.load(SHAPES, ['optim.lr=3e-4', 'train.steps=7', 'loss.itm_start_step=3',
                                    'model.scan_layers=false', "optim.freeze=('^vision/',)"])
  assert config.optim.lr == 3e-4 and config.train.steps == 7 and config.model.scan_layers is False
  assert config.optim.freeze == ('^vision/',)


def test_cli_reports_a_config_error_without_a_traceback():
  result = subprocess.run([sys.executable, '-m', 'xmodal.cli', 'config', '--config', SHAPES,
                           '--config.model.vision.heads=3'], capture_output=True, text=True)
  assert result.returncode == 2
  assert 'model.vision.width' in result.stderr and 'Traceback' not in result.stderr
