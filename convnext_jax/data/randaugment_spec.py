"""timm's RandAugment spec strings (`rand-m9-mstd0.5-inc1`, the ConvNeXt recipe): the settings
they stand for and the op sets they draw from. Pure Python (no TensorFlow): config validation
reads specs with it; `randaugment` runs the policy.
"""

import dataclasses
import math
import re

# timm expresses magnitudes on a 0..10 scale ('m9' = 90% of each op's range).
LEVEL_DENOM = 10.0

# timm's `_RAND_INCREASING_TRANSFORMS` (severity grows with magnitude) and `_RAND_TRANSFORMS`,
# in timm's order; the order is what op indices from `rand_augment_decisions` refer to.
INCREASING_TRANSFORMS = (
    'AutoContrast',
    'Equalize',
    'Invert',
    'Rotate',
    'PosterizeIncreasing',
    'SolarizeIncreasing',
    'SolarizeAdd',
    'ColorIncreasing',
    'ContrastIncreasing',
    'BrightnessIncreasing',
    'SharpnessIncreasing',
    'ShearX',
    'ShearY',
    'TranslateXRel',
    'TranslateYRel',
)
TRANSFORMS = (
    'AutoContrast',
    'Equalize',
    'Invert',
    'Rotate',
    'Posterize',
    'Solarize',
    'SolarizeAdd',
    'Color',
    'Contrast',
    'Brightness',
    'Sharpness',
    'ShearX',
    'ShearY',
    'TranslateXRel',
    'TranslateYRel',
)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """timm's RandAugment settings; the defaults are the ConvNeXt recipe `rand-m9-mstd0.5-inc1`.

  Attributes:
    num_layers: ops per image ('n'), each drawn uniformly with replacement.
    magnitude: mean magnitude on timm's 0..10 scale ('m').
    magnitude_std: std of the per-op magnitude noise ('mstd'); 0 keeps `magnitude`, inf draws
      uniformly from [0, magnitude].
    magnitude_max: upper clip of the drawn magnitude ('mmax').
    prob: probability that each drawn op is applied ('p').
    increasing: use timm's increasing-severity op set ('inc1'), else its original set.
    translate_pct: largest translation as a fraction of the image side (a timm hparam).
  """

  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  magnitude_max: float = 10.0
  prob: float = 0.5
  increasing: bool = True
  translate_pct: float = 0.45

  def __post_init__(self):
    problems = []
    if not isinstance(self.num_layers, int) or self.num_layers < 0:
      problems.append(f'num_layers={self.num_layers!r} must be an int >= 0')
    if not self.magnitude >= 0:
      problems.append(f'magnitude={self.magnitude!r} must be >= 0')
    if not self.magnitude_std >= 0:
      problems.append(f'magnitude_std={self.magnitude_std!r} must be >= 0 (or inf)')
    if not 0 < self.magnitude_max < math.inf:
      problems.append(f'magnitude_max={self.magnitude_max!r} must be finite and > 0')
    if not 0 <= self.prob <= 1:
      problems.append(f'prob={self.prob!r} must be in [0, 1]')
    if not 0 <= self.translate_pct < math.inf:
      problems.append(f'translate_pct={self.translate_pct!r} must be finite and >= 0')
    if problems:
      raise ValueError('Invalid RandAugmentConfig: ' + '; '.join(problems) + '.')

  @classmethod
  def parse(cls, spec: str) -> 'RandAugmentConfig':
    """Parses a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' or 'rand-m7-n3-p0.7'.

    Sections after 'rand' are m (magnitude), n (num_layers), p (prob), mstd (magnitude_std,
    above 100 meaning uniform), mmax (magnitude_max) and inc (increasing, 0 or 1). Absent
    sections take timm's defaults (m10, n2, p0.5, mstd0, mmax10, inc0), not this class's.
    Unlike timm, which ignores sections it cannot read and treats any 'inc<digits>' as on,
    anything unrecognised is an error and 'inc0' is off.

    Args:
      spec: the RandAugment string.

    Returns:
      The config.

    Raises:
      ValueError: if the string is not a RandAugment spec this module implements.
    """
    sections = spec.split('-')
    if sections[0] != 'rand':
      raise ValueError(
          f"RandAugment spec {spec!r} must start with 'rand', e.g. 'rand-m9-mstd0.5-inc1'."
      )
    values = dict(
        magnitude=LEVEL_DENOM,
        num_layers=2,
        prob=0.5,
        magnitude_std=0.0,
        magnitude_max=LEVEL_DENOM,
        increasing=False,
    )
    parsers = {
        'm': ('magnitude', float),
        'n': ('num_layers', int),
        'p': ('prob', float),
        'mstd': ('magnitude_std', lambda v: math.inf if float(v) > 100 else float(v)),
        'mmax': ('magnitude_max', float),
        'inc': ('increasing', lambda v: bool(int(v))),
    }
    for section in sections[1:]:
      if section.startswith('t') and not section[1:2].isdigit():
        raise ValueError(
            f'RandAugment spec {spec!r}: transform sets ({section!r}) are not '
            'implemented; only the default and increasing sets are.'
        )
      match = re.fullmatch(r'([a-z]+)(\d.*)', section)
      if match is None or match.group(1) not in parsers:
        raise ValueError(
            f'RandAugment spec {spec!r}: cannot read section {section!r}; '
            f'expected one of {sorted(parsers)} followed by a number.'
        )
      key, text = match.groups()
      field, parse_value = parsers[key]
      try:
        values[field] = parse_value(text)
      except ValueError:
        raise ValueError(
            f'RandAugment spec {spec!r}: {text!r} is not a valid value for {key!r} ({field}).'
        ) from None
    return cls(**values)


def transform_names(config: RandAugmentConfig):
  """The op names `rand_augment` draws from, in the order op indices refer to."""
  return INCREASING_TRANSFORMS if config.increasing else TRANSFORMS
