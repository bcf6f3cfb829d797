"""Parameter trees by name, and one comparison of the shapes a model expects with a found tree.

A leaf's name is its key path joined with '/' ('stages.0.0/dwconv/kernel', or for an optimizer
state '0/mu/stages.0.0/dwconv/kernel'): what sharding rules, layer ids and checkpoints match
on. `compare` lists the names missing, unexpected and mis-shaped between an expected
{name: shape} and a found one; checkpoint loading, prediction and conversion each raise their
own one-line error around `Difference.describe()`, with their own advice.
"""

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses

import jax
import numpy as np

Shape = tuple[int, ...]


def name(path) -> str:
  """The '/'-joined name of a pytree key path (dict keys, attribute names, indices)."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def shapes(tree) -> dict[str, Shape]:
  """{name: shape} of every leaf (arrays, ShapeDtypeStructs or orbax array metadata)."""
  return {name(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listing(items: Sequence[str], limit: int) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f' ... and {len(items) - limit} more' if len(items) > limit else '')


@dataclasses.dataclass(frozen=True)
class Difference:
  """Where a found tree differs from the expected one, by name; false when they agree.

  Attributes:
    missing: expected names the found tree lacks, in expected order.
    unexpected: found names that are not expected, in found order.
    misshaped: (name, found shape, expected shape) of names in both with other shapes.
  """

  missing: tuple[str, ...] = ()
  unexpected: tuple[str, ...] = ()
  misshaped: tuple[tuple[str, Shape, Shape], ...] = ()

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.misshaped)

  def without(self, names: Iterable[str]) -> 'Difference':
    """The difference with `names` left out (those the caller tolerates or mends)."""
    names = frozenset(names)
    return Difference(
        tuple(n for n in self.missing if n not in names),
        tuple(n for n in self.unexpected if n not in names),
        tuple(m for m in self.misshaped if m[0] not in names),
    )

  def describe(self, unit: str = '', limit: int = 6) -> str:
    """One line, e.g. 'missing 2: a, b; unexpected 1: c; mis-shaped 1: d (3, 4) != expected
    (4, 3)', at most `limit` names of each kind; `unit` follows each count ('key(s)')."""
    unit = f' {unit}' if unit else ''
    kinds = (
        ('missing', self.missing),
        ('unexpected', self.unexpected),
        ('mis-shaped', [f'{n} {found} != expected {want}' for n, found, want in self.misshaped]),
    )
    return '; '.join(
        f'{kind} {len(items)}{unit}: {_listing(items, limit)}' for kind, items in kinds if items
    )


def compare(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]
) -> Difference:
  """What differs between two {name: shape} mappings (`shapes` makes them from trees)."""
  return Difference(
      missing=tuple(n for n in expected if n not in found),
      unexpected=tuple(n for n in found if n not in expected),
      misshaped=tuple(
          (n, tuple(found[n]), tuple(want))
          for n, want in expected.items()
          if n in found and tuple(found[n]) != tuple(want)
      ),
  )
