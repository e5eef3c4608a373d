"""Shared benchmark pieces: a tljax train step built as `tljax.train` builds it, and timing."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tljax import build, optim, resolve, steps
from tljax import config as config_lib


@dataclasses.dataclass
class JaxSetup:
  """A compiled tljax train step for one model and freeze depth, with its state and a batch."""
  config: ml_collections.ConfigDict
  state: steps.TrainState
  batch: dict[str, jax.Array]
  compiled: Any
  compile_s: float  # XLA compilation alone
  lower_s: float  # tracing and lowering before it
  trainable_params: int
  opt_state_bytes: int
  opt_state_param_bytes: int  # the parameter-shaped leaves (momenta), without scalar counters


def make_config(model: str, preset: str, image_size: int, batch_size: int,
                num_classes: int = 10, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """The resolved config of a `model` run frozen as `preset` says, with dotted-key overrides."""
  config = config_lib.resolve(ml_collections.ConfigDict(dict(
      model=dict(name=model, num_classes=num_classes),
      data=dict(image_size=image_size, batch_size=batch_size),
      freeze=dict(preset=preset),
      optim=dict(name='sgd', lr=0.01, momentum=0.9, weight_decay=1e-4))))
  for key, value in (overrides or {}).items():
    config_lib.set_override(config, key, value)
  # Benchmarks feed their own batches: no data.source need name a dataset (one that reads data
  # sets data.source in `overrides`).
  return resolve.resolve_config(config, source_given=config.data.source == 'tfds'
                                and not config.data.name)


def trainable_params(params: Any, mask: Any) -> int:
  """Parameters of the leaves `mask` marks trainable."""
  return sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                             strict=True) if m)


def random_batch(batch_size: int, image_size: int, num_classes: int = 10, seed: int = 0
                 ) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return dict(image=rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
              label=rng.integers(0, num_classes, batch_size).astype(np.int32))


def build_step(config: ml_collections.ConfigDict, make_step: Callable = steps.make_train_step
               ) -> JaxSetup:
  """Model, state and the jitted (donating) train step of `config`, compiled and timed."""
  built = build.build(config, 1000)
  params, mask, state = built.params, built.mask, built.state
  step = jax.jit(make_step(built.model, built.optimizer, mask, built.schedule, config.seed),
                 donate_argnums=0)
  batch = jax.tree.map(jnp.asarray, random_batch(config.data.batch_size, config.data.image_size,
                                                 config.model.num_classes))
  start = time.perf_counter()
  lowered = step.lower(state, batch)  # Python tracing and lowering to StableHLO
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()  # XLA compilation, or a persistent-cache hit
  compile_s = time.perf_counter() - start - lower_s
  trainable = trainable_params(params, mask)
  param_shaped = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if np.ndim(x))
  return JaxSetup(config, state, batch, compiled, compile_s, lower_s, trainable,
                  optim.state_leaf_stats(state.opt_state)[1], int(param_shaped))


def time_calls(call: Callable[[], Any], steps_timed: int, warmup: int) -> list[float]:
  """Seconds per call (each waits for its result) after `warmup` untimed calls."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps_timed):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


@dataclasses.dataclass
class Timed:
  """A step compiled from `lower`, its compile time, its step times and the state it ended in."""
  compiled: Any
  compile_s: float
  times: list[float]
  state: Any


def compile_and_time(step: Any, state: Any, batch: Any, steps_timed: int, warmup: int) -> Timed:
  """Compiles the jitted `step` for (state, batch), then times `steps_timed` calls of it after
  `warmup` untimed ones, each waiting for its metrics (the step returns (state, metrics))."""
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def one():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  times = time_calls(one, steps_timed, warmup)
  return Timed(compiled, compile_s, times, state)


def time_jax_steps(setup: JaxSetup, steps_timed: int, warmup: int) -> list[float]:
  state = setup.state

  def one():
    nonlocal state
    state, metrics = setup.compiled(state, setup.batch)
    jax.block_until_ready(metrics)

  times = time_calls(one, steps_timed, warmup)
  setup.state = state
  return times


def flops(compiled: Any) -> float | None:
  """XLA's cost-analysis FLOPs of a compiled computation (None where the backend has none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older jax returned one dict per device
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def peak_memory_bytes(compiled: Any) -> tuple[int | None, str]:
  """(bytes, how measured): XLA's buffer assignment for the step, arguments + outputs +
  temporaries - donated, the same measure on every backend (an allocator's peak would be the
  whole process's, not this step's)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None, 'n/a'
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return int(total), 'XLA buffers'


def machine() -> dict[str, Any]:
  """What the figures were measured on."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  device = jax.devices()[0]
  return dict(backend=jax.default_backend(), device=device.device_kind, cpu=cpu,
              cpu_count=os.cpu_count(), jax=jax.__version__)


def median(values: list[float]) -> float:
  return statistics.median(values)


def write_json(path: str, payload: Any) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)
