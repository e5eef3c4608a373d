"""One building step from a resolved config to what a run trains: the model (its frozen
BatchNorm layers set), the first TrainState (pretrained weights loaded), the freeze groups and
labels, the trainable mask, the optimizer and the schedule. train.py, the tests and the
benchmarks all build through `build`, so the optimizer-to-step wiring exists once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from tljax import freeze, lora, optim, parallel, steps, unfreeze
from tljax.errors import UserError
from tljax.models import build_model, get_entry, init_variables
from tljax.models.layers import NormSpec
from tljax.weights import load as weights_load


@dataclasses.dataclass(frozen=True)
class Phase:
  """What trains in one phase of gradual unfreezing (the whole run without it): the labels,
  the trainable mask, the model (its frozen BatchNorm layers set) and the optimizer."""
  after: int  # trains the steps after this one
  labels: Any
  mask: Any
  model: Any
  optimizer: optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` returns: everything the train loop needs before device placement. `model`,
  `labels`, `mask` and `optimizer` are the first phase's; `final_labels` the last phase's."""
  config: ml_collections.ConfigDict  # resolved (tljax.resolve.resolve_config)
  model: Any  # the Linen module (a tljax.lora.LoraModel around it with lora.rank)
  state: steps.TrainState  # step 0: pretrained or fresh variables, zero optimizer state
  groups: list[freeze.Group]
  labels: Any  # the params pytree with each leaf's group label
  mask: Any  # the params pytree with True where a leaf trains
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  load_report: dict[str, list[str]] | None  # pretrained merge report; None when not loaded
  phases: tuple[Phase, ...] = ()  # gradual unfreezing's phases; one without it
  final_labels: Any = None
  unfreezing: tuple[unfreeze.Phase, ...] | None = None  # the schedule, None without it

  @property
  def params(self) -> Any:
    return self.state.params

  @property
  def batch_stats(self) -> Any:
    return self.state.batch_stats

  def phase_at(self, step: int) -> int:
    """Index in `phases` of the phase that trains `step` (step 0: the first)."""
    return 0 if self.unfreezing is None else unfreeze.phase_at(self.unfreezing, step)

  def train_step(self, model: Any = None, phase: int = 0, **options: Any) -> Callable:
    """steps.make_train_step for phase `phase` of this build (`model`: another view of it,
    e.g. the feature cache's); `options` are make_train_step's keyword arguments."""
    current = self.phases[phase]
    return steps.make_train_step(model or current.model, current.optimizer, current.mask,
                                 self.schedule, self.config.seed,
                                 self.config.optim.label_smoothing, **options)

  def state_for_phase(self, state: steps.TrainState, phase: int) -> steps.TrainState:
    """`state` (of an earlier phase) with the optimizer state of phase `phase`: moments of
    leaves that trained before carried over, those of newly unfrozen leaves zero."""
    fresh = self.phases[phase].optimizer.init(state.params)
    return state.replace(opt_state=unfreeze.carry_state(state.opt_state, fresh))


def load_variables(config: ml_collections.ConfigDict, model: Any
                   ) -> tuple[dict[str, Any], dict[str, list[str]] | None]:
  """`model`'s variables: init.pretrained loaded (the merge report beside them), or fresh (None)."""
  entry = get_entry(config.model.name)
  size = config.data.max_length if entry.modality == 'text' else config.data.image_size
  init = functools.partial(init_variables, model, size, config.data.channels, config.seed,
                           entry.example_input)
  if not config.init.pretrained:
    return init(), None
  return weights_load.load_pretrained_lazily(
      config.init.pretrained, config.model.name, model, init, config.init.dont_load,
      config.init.layout)


def _with_adapters(config: ml_collections.ConfigDict, model: Any, params: Any,
                   groups: list[freeze.Group]) -> tuple[Any, Any, list[freeze.Group]]:
  """LoRA: adapters added under params['lora'], the model wrapped to apply them, and a frozen
  group for the adapted kernels put first."""
  spec = config.lora
  targets = lora.find_targets(params, tuple(spec.targets))
  lora.check_rank(spec.rank, targets)
  params = lora.init_adapters(params, targets, spec.rank, config.seed)
  model = lora.LoraModel(model, targets, spec.alpha, spec.rank, spec.dropout)
  pattern = '(?!lora/)({})'.format('|'.join(f'(?:{t})' for t in spec.targets))
  # First, so the kernels stay frozen whatever optim.groups says; the groups keep their indices
  # (an error names optim.groups[i] as the user wrote it).
  adapted = freeze.Group(freeze.ADAPTED, pattern, None, 0.0)
  return model, params, [adapted, *groups]


def _anchored(config: ml_collections.ConfigDict, mask: Any,
              report: dict[str, list[str]] | None) -> Any:
  """L2-SP: the trainable leaves that start from pretrained values (not a fresh head, not an
  adapter); None without optim.l2sp."""
  if not config.optim.l2sp:
    return None
  fresh = set(report['kept_fresh']) if report else set()
  flat = freeze.flat_paths(mask)
  return traverse_util.unflatten_dict(
      {path: bool(m) and f'params/{path}' not in fresh and not path.startswith('lora/')
       for path, m in flat.items()}, sep='/')


def _phase(config: ml_collections.ConfigDict, model: Any, batch_stats: Any, groups: Any,
           labels: Any, after: int, total_steps: int, report: Any
           ) -> tuple[Phase, optax.Schedule]:
  if isinstance(getattr(model, 'norm', None), NormSpec):  # BatchNorm models
    norm = dataclasses.replace(
        model.norm, frozen=freeze.frozen_norm_paths(labels, batch_stats),
        axis_name=parallel.PMAP_AXIS if config.parallel == 'pmap' else None)
    model = model.clone(norm=norm)
  mask = freeze.trainable_mask(labels)
  optimizer, schedule = optim.make_optimizer(config.optim, groups, labels, total_steps,
                                             _anchored(config, mask, report))
  return Phase(after, labels, mask, model, optimizer), schedule


@dataclasses.dataclass(frozen=True)
class Plan:
  """What trains, from the config and the parameter paths alone: the model (wrapped for LoRA),
  the params (with adapters), the groups as expanded, the last phase's labels, and the gradual
  unfreezing schedule (None without it)."""
  model: Any
  params: Any
  groups: list[freeze.Group]
  final_labels: Any
  unfreezing: list[unfreeze.Phase] | None

  def phase_labels(self, stages: tuple[str, ...]) -> list[tuple[int, Any]]:
    """(after, labels) of every phase; one phase without gradual unfreezing."""
    if self.unfreezing is None:
      return [(0, self.final_labels)]
    phases = []
    for spec in self.unfreezing:
      labels = unfreeze.phase_labels(self.final_labels, stages, spec.frozen)
      if not any(jax.tree.leaves(freeze.trainable_mask(labels))):
        raise unfreeze.UnfreezeError('gradual unfreezing starts as a linear probe, but the '
                                     'freeze groups freeze the head; let the head train')
      phases.append((spec.after, labels))
    return phases


def plan(config: ml_collections.ConfigDict, model: Any, params: Any, pretrained: bool) -> Plan:
  """The strategy keys applied to `params` (arrays, or the shapes of jax.eval_shape): LoRA
  adapters, layer decay groups, labels and the unfreezing schedule, each checked."""
  if config.optim.l2sp and not pretrained:
    raise UserError(f'optim.l2sp={config.optim.l2sp} pulls the weights towards their '
                    'pretrained values, but there are none (init.pretrained is unset or '
                    "freeze.preset is 'scratch'); set init.pretrained or optim.l2sp=0")
  groups = freeze.parse_groups(config.optim.groups)
  if config.lora.rank:
    model, params, groups = _with_adapters(config, model, params, groups)
  elif tuple(config.lora.targets):
    raise UserError('lora.targets is set but lora.rank is 0 (no adapters); set lora.rank, e.g. '
                    '--config.lora.rank=4, or leave lora.targets empty')
  stages = get_entry(config.model.name).stages
  if config.optim.layer_decay is not None:
    groups = freeze.decay_groups(groups, params, stages, float(config.optim.layer_decay))
  final_labels = freeze.label_tree(params, groups)
  schedule = unfreeze.phases(config.freeze, stages,
                             freeze.frozen_stage_count(final_labels, stages))
  result = Plan(model, params, groups, final_labels, schedule)
  result.phase_labels(stages)  # refuses a schedule whose first phase trains nothing
  return result


def check(config: ml_collections.ConfigDict) -> None:
  """Everything `build` checks of the strategy keys, on the parameters' shapes (no weights
  loaded, nothing run): a sweep checks every variant before the first one trains."""
  entry = get_entry(config.model.name)
  model = build_model(config.model.name,
                      **{k: v for k, v in config.model.to_dict().items() if k != 'name'})
  size = config.data.max_length if entry.modality == 'text' else config.data.image_size
  shapes = init_variables(model, size, config.data.channels, config.seed, entry.example_input,
                          shapes_only=True)['params']
  plan(config, model, shapes, bool(config.init.pretrained))


def build(config: ml_collections.ConfigDict, total_steps: int | None = None) -> Built:
  """The model, first state and optimizer of a resolved `config`, the schedule spanning
  `total_steps` (default: config.total_steps)."""
  model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  model = build_model(config.model.name, **model_kwargs)
  variables, report = load_variables(config, model)
  batch_stats = variables.get('batch_stats', {})
  planned = plan(config, model, variables['params'], report is not None)
  params = planned.params
  total = total_steps or config.total_steps
  phases, schedule = [], None
  for after, labels in planned.phase_labels(get_entry(config.model.name).stages):
    phase, schedule = _phase(config, planned.model, batch_stats, planned.groups, labels, after,
                             total, report)
    phases.append(phase)
  first = phases[0]
  state = steps.TrainState(jnp.asarray(0, jnp.int32), params, batch_stats,
                           first.optimizer.init(params))
  return Built(config, first.model, state, planned.groups, first.labels, first.mask,
               first.optimizer, schedule, report, tuple(phases), planned.final_labels,
               None if planned.unfreezing is None else tuple(planned.unfreezing))


def l2sp_line(built: Built) -> str | None:
  """What optim.l2sp pulls towards the pretrained weights, for the group table (None: off)."""
  if not built.config.optim.l2sp:
    return None
  anchored = _anchored(built.config, freeze.trainable_mask(built.final_labels),
                       built.load_report)
  pulled = [x for x, a in zip(jax.tree.leaves(built.params), jax.tree.leaves(anchored),
                              strict=True) if a]
  return (f'optim.l2sp={built.config.optim.l2sp}: {len(pulled)} trainable tensors '
          f'({sum(int(x.size) for x in pulled):,} params) pulled towards their pretrained '
          'values; weight decay only on the others (a fresh head)')


def load_line(built: Built) -> str | None:
  """What loading the pretrained weights did, in one line (None without them)."""
  report = built.load_report
  if report is None:
    return None
  return (f'pretrained {built.config.init.pretrained}: loaded {len(report["loaded"])} arrays, '
          f'kept {len(report["kept_fresh"])} fresh ({", ".join(report["kept_fresh"])})'
          + (f', resized {report["resized"]}' if report['resized'] else ''))

