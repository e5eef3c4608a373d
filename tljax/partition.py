"""Which mesh axes each leaf of the train state is split over: replicated, FSDP, 2-D meshes.

The rule looks only at a leaf's shape and dtype, so a parameter and its optimizer moments get
the same layout and no parameter names are needed. FSDP follows big_vision's rule: a leaf of at
least `min_size_mb` is split along its largest dimension that the 'data' axis divides; smaller
leaves stay replicated, because gathering them would cost more than the memory they take. On a
2-D ('data', 'model') mesh, large leaves also split their last (output-feature) dimension over
'model', and the devices along 'model' work on the same examples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from tljax.errors import UserError

DATA_AXIS = 'data'
MODEL_AXIS = 'model'
RULES = ('replicate', 'fsdp')


@dataclasses.dataclass(frozen=True)
class Layout:
  """The mesh shape and the rule that places the train state on it."""
  rule: str = 'replicate'
  min_size_mb: float = 4.0
  data: int = 1  # devices along 'data': the batch is split over them
  model: int = 1  # devices along 'model': each holds a slice of the large leaves

  @property
  def axis_names(self) -> tuple[str, ...]:
    return (DATA_AXIS, MODEL_AXIS) if self.model > 1 else (DATA_AXIS,)

  @property
  def mesh_shape(self) -> tuple[int, ...]:
    return (self.data, self.model) if self.model > 1 else (self.data,)

  def spec(self, shape: tuple[int, ...], dtype: Any) -> P:
    """The PartitionSpec of one leaf."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if not shape or nbytes < self.min_size_mb * 2**20:
      return P()
    axes: list[str | None] = [None] * len(shape)
    if self.model > 1 and shape[-1] % self.model == 0:
      axes[-1] = MODEL_AXIS
    if self.rule == 'fsdp' and self.data > 1:
      free = [d for d in np.argsort(shape, kind='stable')[::-1]
              if axes[d] is None and shape[d] % self.data == 0]
      if free:
        axes[free[0]] = DATA_AXIS
    while axes and axes[-1] is None:
      axes.pop()
    return P(*axes)

  def tree_specs(self, tree: Any) -> Any:
    """PartitionSpecs for every array leaf of `tree` (same structure)."""
    return jax.tree.map(lambda x: self.spec(np.shape(x), x.dtype), tree)


def make_layout(sharding: Any, device_count: int, local_device_count: int,
                parallel: str = 'jit') -> Layout:
  """The Layout a config's `sharding` section asks for, checked against the devices."""
  rule, model, min_size_mb = sharding['rule'], sharding['model_axis'], sharding['min_size_mb']
  if rule not in RULES:
    raise UserError(f'sharding.rule must be one of {RULES}, got {rule!r}')
  if isinstance(min_size_mb, bool) or not isinstance(min_size_mb, int | float) or min_size_mb < 0:
    raise UserError(f'sharding.min_size_mb must be a number >= 0, got {min_size_mb!r}')
  if isinstance(model, bool) or not isinstance(model, int):
    raise UserError(f'sharding.model_axis must be an integer, got {model!r}')
  if model < 1 or local_device_count % model:
    raise UserError(f'sharding.model_axis={model} must be >= 1 and divide the '
                    f'{local_device_count} devices of each process (a model slice never spans '
                    'processes: they read different examples)')
  if parallel != 'jit' and (rule != 'replicate' or model != 1):
    raise UserError(f"sharding.rule={rule!r} and sharding.model_axis={model} need "
                    f"parallel='jit' (pmap replicates the state), got parallel={parallel!r}")
  return Layout(rule, float(min_size_mb), device_count // model, model)
