"""Fine-tune a model with frozen subtrees: build -> restore -> step -> eval -> save.

  python -m tljax.train --config=configs/FILE.py[:ARG] --workdir=DIR [--config.a.b=value ...]

The same command resumes from the newest complete checkpoint in DIR, and leaves a finished run
as it is. Exit status: 0 done (or already finished), 2 bad input (one `error:` line naming the
key, path or file), 75 stopped by SIGTERM or Ctrl-C after saving a checkpoint or before anything
needed saving (run the same command again), 130 a second Ctrl-C (stopped at once).
"""

from __future__ import annotations

if __name__ == '__main__':  # from here on, SIGTERM and Ctrl-C are recorded, not fatal
  from tljax import preemption as _preemption
  _preemption.install_early()

import dataclasses
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from tljax import (
  build,
  checkpoint,
  class_metrics,
  cli,
  console,
  features,
  freeze,
  lora,
  metrics,
  numerics,
  optim,
  parallel,
  partition,
  preemption,
  report,
  resolve,
  saved_model,
  steps,
  unfreeze,
)
from tljax import config as config_lib
from tljax import workdir as workdir_lib
from tljax.data import pipeline, sources
from tljax.errors import PREEMPTED_EXIT_CODE, Preempted, UserError, exit_status
from tljax.models import get_entry


@dataclasses.dataclass
class FeatureCache:
  """The frozen prefix's outputs for every training example (tljax.features)."""
  stage: str
  arrays: dict[str, np.ndarray]
  seconds: float

  def summary(self) -> dict[str, Any]:
    cached = self.arrays[features.FEATURES]
    return dict(stage=self.stage, examples=len(self.arrays['label']),
                shape=list(cached.shape[1:]), bytes=int(cached.nbytes), seconds=self.seconds)


def _feature_cut(config: ml_collections.ConfigDict, labels: Any) -> str:
  """The stage whose input data.cache_features caches (refused, naming why, if none can be)."""
  entry = get_entry(config.model.name)
  augmented = config.data.augment and entry.modality == 'image'  # texts are not augmented
  return features.cut_stage(entry.stages, freeze.frozen_stage_count(labels, entry.stages),
                            augmented)


def _cached_features(config: ml_collections.ConfigDict, model, state: steps.TrainState,
                     labels: Any, source: sources.Source, dtype: str | None,
                     input_keys: tuple[str, ...]) -> FeatureCache:
  """Runs the frozen prefix over the training split once (in the compute dtype); each phase's
  train step applies its model to these features through `_from_cut`."""
  start = time.perf_counter()
  cut = _feature_cut(config, labels)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if dtype is not None:
    variables = steps.cast_floats(variables, dtype)
  examples = pipeline.ordered_train_examples(source, config.data, config.seed)
  if dtype is not None:
    examples = ({**b, **dict(zip(input_keys, steps.model_inputs(b, input_keys, dtype),
                                 strict=True))} for b in examples)
  arrays = features.compute(model, variables, examples, cut, input_keys)
  cache = FeatureCache(cut, arrays, time.perf_counter() - start)
  if jax.process_index() == 0:
    print(f'cached the input of stage {cut!r} for {len(arrays["label"])} examples '
          f'({arrays[features.FEATURES].nbytes / 2**20:.1f} MiB) in {cache.seconds:.1f} s',
          flush=True)
  return cache


def _from_cut(config: ml_collections.ConfigDict, model, cut: str) -> features.FromCut:
  """`model` applied to the cached input of stage `cut` (the train step's view of it)."""
  first_input = _probe_inputs(config, 1)[0]
  return features.FromCut(model, cut, first_input.shape[1:], first_input.dtype)


def _compute_model(model, dtype: str | None):
  """Mixed precision: the model computing in `dtype` (parameters stay float32)."""
  return model.clone(dtype=jnp.dtype(dtype)) if dtype is not None and hasattr(
      model, 'dtype') else model


def _enter_phase(built: build.Built, runner, state: steps.TrainState, phase: int
                 ) -> steps.TrainState:
  """The placed `state` moved into phase `phase` of gradual unfreezing: its optimizer state
  re-laid for the phase's labels (tljax.unfreeze.carry_state), on the devices as before."""
  if runner.name == 'pmap':
    return runner.place_state(built.state_for_phase(runner.host_state(state), phase))
  move = lambda s: built.state_for_phase(s, phase)  # noqa: E731
  shardings = runner.state_shardings(jax.eval_shape(move, state))
  return jax.jit(move, out_shardings=shardings)(state)


def _probe_inputs(config: ml_collections.ConfigDict, count: int) -> list[jax.Array]:
  """`count` made-up examples of the model's inputs: images of normal noise, or texts of
  random token ids (a full attention mask, one segment)."""
  rng = np.random.default_rng(0)
  if get_entry(config.model.name).modality == 'text':
    length = config.data.max_length
    ids = rng.integers(1, min(resolve.model_value(config, 'vocab_size'), 1000), (count, length))
    return [jnp.asarray(ids, jnp.int32), jnp.ones((count, length), jnp.int32),
            jnp.zeros((count, length), jnp.int32)]
  size, channels = config.data.image_size, config.data.channels
  return [jnp.asarray(rng.normal(size=(count, size, size, channels)), jnp.float32)]


def _layout_line(summary: dict[str, Any]) -> str:
  mesh = ' x '.join(f'{name} {size}' for name, size in summary['mesh'].items())
  return (f'state layout {summary["rule"]!r} on mesh ({mesh}): {summary["split_leaves"]} of '
          f'{summary["leaves"]} leaves split, {summary["bytes_per_device"]:,} bytes per device '
          f'({summary["bytes_replicated"]:,} replicated)')


@dataclasses.dataclass
class Evaluation:
  """One split evaluated: scalar `metrics` (logged) and `details` (per-class results and the
  confusion matrix, for results.json)."""
  step: int
  metrics: dict[str, float]
  details: dict[str, Any]

  def as_result(self) -> dict[str, Any]:
    return {**self.metrics, **self.details}


def evaluate(eval_step, state, eval_data: pipeline.EvalBatches, step: int = 0,
             class_names: list[str] | None = None) -> Evaluation:
  """Sums of every batch's metrics and confusion matrix over the split, as one Evaluation."""
  sums: dict[str, float] = {}
  confusion = None
  for batch in eval_data:
    outputs = dict(eval_step(state, batch))
    matrix = np.asarray(outputs.pop('confusion'))
    matrix = matrix.reshape(-1, *matrix.shape[-2:])[0].astype(np.int64)  # pmap: one replica
    confusion = matrix if confusion is None else confusion + matrix
    for k, v in outputs.items():
      sums[k] = sums.get(k, 0.0) + float(np.asarray(v).reshape(-1)[0])
  count = max(sums['count'], 1.0)
  grouped = {f'accuracy_{k[len("correct_"):]}': v / count for k, v in sums.items()
             if k.startswith('correct_')}
  names = class_names if class_names and len(class_names) == len(confusion) else None
  per_class, details = class_metrics.summarize(confusion, names)
  return Evaluation(step, dict(loss=sums['loss'] / count, accuracy=sums['correct'] / count,
                               **per_class, **grouped, examples=int(sums['count'])), details)


def _check_schedule_kept(config: ml_collections.ConfigDict, workdir: str, total_steps: int,
                         train_examples: int) -> None:
  """A resumed run must follow the schedule its checkpoints were trained on: raising
  total_steps would re-stretch a decaying schedule (the learning rate at the resumed step would
  jump). Refused, naming the key that keeps the schedule as it was."""
  saved = workdir_lib.saved_config(workdir)
  if not saved or config.optim.schedule.name == 'constant':
    return
  try:
    earlier_total = config_lib.total_steps(ml_collections.ConfigDict(saved), train_examples)
    earlier = optim.schedule_steps(saved['optim']['schedule'], earlier_total)
  except (KeyError, TypeError, ValueError):  # a config.json of an older tljax: nothing to compare
    return
  now = optim.schedule_steps(config.optim.schedule, total_steps)
  if now != earlier:
    raise workdir_lib.WorkdirError(
        f'{workdir} was trained on a {config.optim.schedule.name} schedule over {earlier} steps; '
        f'this run would stretch it over {now}, so the learning rate would jump at the resumed '
        f'step. To train on with the schedule as it was (held after step {earlier} at its final '
        f'value, optim.schedule.end_factor times optim.lr), add '
        f'--config.optim.schedule.steps={earlier}; or pass --fresh to start over')


def _check_classes_kept(workdir: str, class_names: list[str] | None) -> None:
  """A resumed run must see the classes its checkpoints learnt, in the same order: data whose
  labels changed under the same data.path would silently give the outputs new meanings."""
  if not os.path.isfile(os.path.join(workdir, saved_model.RECORD_FILE)):
    return
  saved = saved_model.read_record(workdir).get('class_names')
  if saved is not None and class_names is not None and list(saved) != list(class_names):
    pairs = enumerate(zip(saved, class_names, strict=False))
    changed = ([f'{i}: {a!r} -> {b!r}' for i, (a, b) in pairs if a != b]
               or [f'{len(saved)} -> {len(class_names)} classes'])
    raise workdir_lib.WorkdirError(
        f'{workdir} holds checkpoints trained on other classes than the data now has '
        f'({"; ".join(changed[:3])}); resuming would give the outputs new meanings. Restore '
        'the data, use another workdir, or pass --fresh to move the earlier run aside')


def _finished(results: dict[str, Any], workdir: str, step: int) -> dict[str, Any]:
  if jax.process_index() == 0:
    print(f'{workdir} already finished: its results.json holds step {step}; nothing to do (raise '
          'total_steps to train on, or pass --fresh to start over)', flush=True)
  return results


def run(config: ml_collections.ConfigDict, workdir: str,
        source: sources.Source | None = None, fresh: bool = False) -> dict[str, Any]:
  """Trains as `config` says in `workdir`, resuming if it holds checkpoints; returns results.

  Everything that can be wrong with the config, data, weights or workdir is checked before the
  first file is written; a finished run is left as it is. `fresh` moves an earlier run's files
  aside instead of resuming them. Raises errors.Preempted when SIGTERM or SIGINT arrives (after
  saving a checkpoint, once training has started).
  """
  if config.get('baseline'):  # a classical baseline fitted on the same splits instead
    from tljax import baseline
    return baseline.run(resolve.resolve_config(config, source_given=source is not None),
                        workdir, source, fresh)
  with console.RunLog() as run_log:  # library logs: held now, in the workdir once it is written
    return _run(config, workdir, source, fresh, run_log)


def _run(config: ml_collections.ConfigDict, workdir: str, source: sources.Source | None,
         fresh: bool, run_log: console.RunLog) -> dict[str, Any]:
  wall_start = time.time()
  config = resolve.resolve_config(config, source_given=source is not None)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0

  # Check: config, data, weights; nothing is written until all of them pass.
  layout = partition.make_layout(config.sharding, jax.device_count(), jax.local_device_count(),
                                 config.parallel)
  parallel.check_batch_size(config.data.batch_size, layout)
  dtype = config_lib.compute_dtype(config)
  grad_accum_steps = resolve.grad_accum_steps(config, layout.data)
  entry = get_entry(config.model.name)
  source = sources.with_validation(source or sources.make_source(config.data, entry.modality),
                                   config.data)
  if source.modality != entry.modality:
    raise UserError(f'model {config.model.name!r} reads {entry.modality} but the data source '
                    f'gives {source.modality} examples; choose a model or a source to match')
  train_examples = pipeline.check_splits(source, config.data, config.model.num_classes)
  if entry.modality == 'text':
    resolve.check_tokenizer_fits(config)
  truncated = (pipeline.truncated_counts(source, config.data)
               if entry.modality == 'text' else None)
  if truncated and any(c['truncated'] for c in truncated.values()) and is_main:
    print(f'texts longer than data.max_length={config.data.max_length} tokens are cut to it: '
          + ', '.join(f'{c["truncated"]:,} of {c["texts"]:,} in {c["split"]!r}'
                      for c in truncated.values()), flush=True)
  val_split = sources.validation_split(config.data)
  select = (config.select.metric, config.select.mode) if val_split else None
  class_names = source.class_names
  if val_split and source.labels_in_memory and is_main:  # a held-out fraction has them all
    present = set(source.labels(val_split).tolist())
    absent = [c for c in range(config.model.num_classes) if c not in present]
    if absent:
      shown = [class_names[c] for c in absent] if class_names else absent
      print(f'warning: the validation split {config.data.val_split!r} has no example of '
            f'class(es) {shown}; selection cannot see how the model does on them',
            file=sys.stderr, flush=True)
  total_steps = config_lib.total_steps(config, train_examples)
  warmup = config.optim.schedule.warmup_steps
  if warmup >= total_steps and is_main:  # (a short smoke test of a real config does this)
    print(f'warning: optim.schedule.warmup_steps={warmup} is not below the run\'s '
          f'{total_steps} steps, so the learning rate never reaches optim.lr', file=sys.stderr,
          flush=True)
  built = build.build(config, total_steps)
  if is_main and build.load_line(built):
    print(build.load_line(built), flush=True)
  model, state, labels = built.model, built.state, built.final_labels
  params, batch_stats, groups = built.params, built.batch_stats, built.groups
  groupings = resolve.grouping_tables(config)
  if config.data.cache_features:  # checked now; the features are computed after the writes
    features.check_deterministic(model, dict(params=params, batch_stats=batch_stats),
                                 _probe_inputs(config, 2), _feature_cut(config, labels))
  config_json = config.to_json_best_effort(indent=2)
  runner = parallel.make_runner(config.parallel, layout)

  # The workdir: one run at a time; its files and checkpoints checked and the newest complete
  # checkpoint restored (straight into this run's layout) before anything is written.
  workdir_lib.check_writable(workdir)
  with workdir_lib.lock(workdir), preemption.StopRequests() as stop:
    if not fresh:  # --fresh moves whatever is there aside, damaged or not
      workdir_lib.check_run_files(workdir)
      baseline = (workdir_lib.saved_config(workdir) or {}).get('baseline')
      if baseline:
        raise workdir_lib.WorkdirError(
            f'{workdir} holds a {baseline} baseline, not a training run; use another workdir, '
            'or pass --fresh to move it aside')
    if not fresh and checkpoint.has_checkpoints(workdir):
      workdir_lib.check_resumable(workdir, config_json,
                                  config_lib.base_config().to_json_best_effort())
      _check_classes_kept(workdir, class_names)
    def abstract_state(step: int):  # the train state as saved after `step`, in this layout
      phase = built.phase_at(step)
      return runner.abstract_state(built.state if phase == 0 else jax.eval_shape(
          lambda s: built.state_for_phase(s, phase), built.state))
    resume = (checkpoint.Resume() if fresh else
              checkpoint.restore_newest(workdir, abstract_state))
    start_step = resume.step
    if start_step > total_steps:
      raise workdir_lib.WorkdirError(
          f'workdir {workdir} holds a checkpoint of step {start_step}, past total_steps='
          f'{total_steps}; set total_steps to at least {start_step}, or use another workdir')
    if start_step:
      _check_schedule_kept(config, workdir, total_steps, train_examples)
    earlier = None if fresh else workdir_lib.read_results(workdir)
    if earlier is not None and start_step == total_steps == earlier['final_step']:
      return _finished(earlier, workdir, total_steps)
    stop.check('before anything was written')

    # Build: from here on the run writes. Report what is frozen and what was skipped.
    if fresh:
      moved = workdir_lib.move_aside(workdir) if is_main else None
      parallel.sync_processes('tljax_fresh')
      if moved:
        print(f'--fresh: moved the earlier run to {moved}', flush=True)
    run_log.open(os.path.join(workdir, console.log_file_name(process_index)))
    moved = checkpoint.set_aside(workdir, resume.damaged)
    if is_main and moved:
      print('damaged checkpoints set aside, not deleted: '
            + '; '.join(f'step {step} ({reason}) -> {target}'
                        for (step, reason), target in zip(resume.damaged, moved, strict=True))
            + f'; resuming from {f"step {start_step}" if start_step else "the start"}',
            flush=True)
    if is_main:
      kept = workdir_lib.keep_earlier_results(workdir) if earlier is not None else None
      if kept:
        print(f'training on past the earlier finish: its results are kept in {kept}', flush=True)
      workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), config_json)
      if entry.modality == 'text':  # the workdir is a model: it keeps its tokenizer
        saved_model.copy_tokenizer(config.data, workdir)
      workdir_lib.write_json(os.path.join(workdir, saved_model.RECORD_FILE),
                             saved_model.make_record(config, class_names))
    skipped = source.skipped_files()
    if is_main and skipped:
      for split, files in skipped.items():
        print(f'skipped {len(files)} unreadable image file(s) of split {split!r}: '
              f'{", ".join(files)}', flush=True)
    rows = freeze.summary_rows(params, groups, config.optim.lr)
    if is_main:
      print(freeze.format_table(rows), flush=True)
      late = built.unfreezing and unfreeze.unreached(built.unfreezing, entry.stages, total_steps)
      if late:
        print(late, file=sys.stderr, flush=True)
      for line in (freeze.preset_line(config.freeze.preset, entry.stages, config.model.name),
                   built.unfreezing and unfreeze.describe(built.unfreezing, entry.stages),
                   build.l2sp_line(built)):
        if line:
          print(line, flush=True)

    # Mixed precision: the step computes in compute_dtype from float32 parameters.
    model = _compute_model(model, dtype)
    feature_cache = None
    input_keys = entry.inputs
    if config.data.cache_features:  # the frozen prefix is the same in every checkpoint
      feature_cache = _cached_features(config, model, state, labels, source, dtype,
                                       input_keys)

    if start_step:
      state = resume.state
      logging.info('resumed from step %d', start_step)
      if is_main:
        print(f'resumed from checkpoint at step {start_step}', flush=True)
    state = runner.place_state(state)
    # Read off the placed arrays; the step's out_shardings keep this layout to the end.
    sharding = (dict(rule=layout.rule, **parallel.layout_summary(state, runner.mesh))
                if runner.name == 'jit' else None)
    if is_main and (layout.rule != 'replicate' or layout.model > 1):
      print(_layout_line(sharding), flush=True)
    axis_name = parallel.PMAP_AXIS if runner.name == 'pmap' else None
    train_keys = input_keys if feature_cache is None else (features.FEATURES, *input_keys[1:])
    eval_fn = steps.make_eval_step(model, axis_name=axis_name, groupings=groupings,
                                   compute_dtype=dtype, input_keys=input_keys)

    def compiled_steps(phase: int, state: steps.TrainState):
      """Phase `phase`'s train step (its frozen stages cost only their forward pass), the eval
      step for its state, and the check of its trainable leaves' gradients."""
      phase_model = _compute_model(built.phases[phase].model, dtype)
      if feature_cache is not None:
        phase_model = _from_cut(config, phase_model, feature_cache.stage)
      train = runner.compile_train(built.train_step(
          phase_model, phase, axis_name=axis_name, compute_dtype=dtype,
          grad_accum_steps=grad_accum_steps, input_keys=train_keys), state)
      trainable = steps.split_trainable(params, built.phases[phase].mask)[0]
      return (train, runner.compile_eval(eval_fn, state),
              numerics.StepCheck(numerics.leaf_paths(trainable)))

    phase = built.phase_at(start_step)
    train_step, eval_step, step_check = compiled_steps(phase, state)
    phase_compile_s: dict[int, float] = {}
    if feature_cache is None:
      batches = pipeline.train_batches(source, config.data, start_step=start_step,
                                       seed=config.seed, process_index=process_index,
                                       process_count=process_count)
    else:
      batches = pipeline.array_batches(feature_cache.arrays, config.data,
                                       start_step=start_step, seed=config.seed,
                                       process_index=process_index, process_count=process_count)
    eval_data = pipeline.EvalBatches(source, config.data, process_index=process_index,
                                     process_count=process_count, split=val_split)
    test_data = eval_data if val_split is None else pipeline.EvalBatches(
        source, config.data, process_index=process_index, process_count=process_count)
    eval_name = 'eval' if val_split is None else 'val'
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints, select)
    log = metrics.MetricsLog(workdir, is_main, resume_step=start_step)
    progress = console.Progress(total_steps, start_step)
    stop.check('before the first step')

    # Step, eval, save; stop after the current step when asked to.
    step_times, last_eval, first_step_s = [], None, None
    last_log_time, last_log_step = time.perf_counter(), start_step
    step_started = last_log_time
    try:
      for step in range(start_step + 1, total_steps + 1):
        entering = built.phase_at(step) != phase
        if entering:  # gradual unfreezing: one more stage trains from this step
          step_check.flush()
          phase = built.phase_at(step)
          step_started = time.perf_counter()
          state = _enter_phase(built, runner, state, phase)
          train_step, eval_step, step_check = compiled_steps(phase, state)
        state, train_metrics = train_step(state, next(batches))
        if first_step_s is None or entering:  # compiles: timed apart, out of the step times
          jax.block_until_ready(train_metrics)
          last_log_time, last_log_step = time.perf_counter(), step
          phase_compile_s[step] = last_log_time - step_started
          if first_step_s is None:
            first_step_s = phase_compile_s[step]
            progress.compiled(step, first_step_s)
        step_check.push(step, train_metrics.pop('nonfinite'))  # checks the step before
        last = step == total_steps
        if step % config.log_every == 0 or last:
          step_check.flush()  # non-finite values never reach the logs
          values = runner.metrics_to_host(train_metrics)  # waits for the step
          now = time.perf_counter()
          if step > last_log_step:
            step_times.append((now - last_log_time) / (step - last_log_step))
          last_log_time, last_log_step = now, step
          log.write(step, 'train', values)
          progress.update(step, dict(loss=values['loss'], lr=values['lr']))
        evaluated = bool(config.eval_every and step % config.eval_every == 0) or last
        if evaluated:
          last_eval = evaluate(eval_step, state, eval_data, step, class_names)
          log.write(step, eval_name, last_eval.metrics)
          if is_main:
            progress.write(f'step {step} {eval_name} ' + ' '.join(
                f'{k}={v:.4g}' for k, v in last_eval.metrics.items()))
          last_log_time = time.perf_counter()  # keep eval out of the step times
        preempted = stop.reached(step)
        selected_metrics = last_eval.metrics if evaluated and select else None
        best = bool(selected_metrics and ckpt.improves(selected_metrics[select[0]]))
        if step % config.checkpoint_every == 0 or last or preempted or best:
          step_check.flush()
          host_state = runner.host_state(state)
          numerics.check_state(host_state, step)
          ckpt.save(step, host_state, selected_metrics)
        if preempted:
          ckpt.wait()
          raise Preempted.saved(step, ckpt.directory)
      progress.close()
      step_check.flush()
      if last_eval is None:  # resumed at the final step: evaluate what was restored
        last_eval = evaluate(eval_step, state, eval_data, total_steps, class_names)
      reported = _final_evaluations(last_eval, state, ckpt, runner, abstract_state,
                                    (eval_step, eval_fn), test_data, eval_data, class_names,
                                    log)
    finally:
      progress.close()
      ckpt.close()
      log.close()

    trainable = sum(r['params'] for r in rows if r['status'] == 'trainable')
    frozen = sum(r['params'] for r in rows if r['status'] == 'frozen')
    opt_leaves, opt_bytes = optim.state_leaf_stats(runner.host_state(state).opt_state)
    results = dict(
        final_step=total_steps, eval=reported['selected']['test'],
        validation=(None if val_split is None else dict(
            split=config.data.val_split, examples=source.num_examples(val_split),
            select=dict(metric=select[0], mode=select[1]))),
        selected_step=reported['selected']['step'],
        last=reported['last'], best=reported['best'],
        wall_time_s=time.time() - wall_start,
        median_step_time_s=statistics.median(step_times) if step_times else None,
        first_step_time_s=first_step_s,  # compilation included
        resumed_from_step=start_step or None,
        preset=config.freeze.preset, pretrained=config.init.pretrained,
        frozen_stages=freeze.frozen_stage_count(labels, get_entry(config.model.name).stages),
        examples_per_class=config.data.examples_per_class,
        train_examples=train_examples,
        trainable_params=trainable, frozen_params=frozen, optimizer_state_leaves=opt_leaves,
        optimizer_state_bytes=opt_bytes, parallel=runner.name, devices=jax.device_count(),
        strategy=_strategy(config, built, phase_compile_s),
        sharding=sharding,
        processes=process_count, compute_dtype=config.compute_dtype,
        feature_cache=None if feature_cache is None else feature_cache.summary(),
        modality=entry.modality, max_length=(config.data.max_length if truncated is not None
                                             else None),
        truncated_texts=truncated,
        skipped_images={split: len(files) for split, files in skipped.items()})
    if is_main:
      report.plot_confusion(reported['selected']['test'], class_names,
                            os.path.join(workdir, CONFUSION_FILE),
                            f'test split, step {reported["selected"]["step"]}')
      workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE), results)
  return results


CONFUSION_FILE = 'confusion_test.png'


def _strategy(config: ml_collections.ConfigDict, built: build.Built,
              phase_compile_s: dict[int, float]) -> dict[str, Any]:
  """The fine-tuning strategy keys of the run, for results.json and the sweep tables; with
  gradual unfreezing, each phase's first step (compilation included) as measured here."""
  adapters = lora.adapter_count(built.params) if config.lora.rank else 0
  return dict(
      layer_decay=config.optim.layer_decay, l2sp=config.optim.l2sp or None,
      lora=(dict(rank=config.lora.rank, alpha=config.lora.alpha,
                 targets=list(config.lora.targets), dropout=config.lora.dropout,
                 adapter_params=adapters) if config.lora.rank else None),
      unfreeze=(None if built.unfreezing is None else [
          dict(after=phase.after, frozen_stages=phase.frozen,
               first_step_s=phase_compile_s.get(phase.after + 1))
          for phase in built.unfreezing]))


def _final_evaluations(last_eval: Evaluation, state, ckpt: checkpoint.Checkpointer, runner,
                       abstract_state, eval_steps, test_data: pipeline.EvalBatches,
                       val_data: pipeline.EvalBatches, class_names: list[str] | None,
                       log: metrics.MetricsLog) -> dict[str, Any]:
  """The test split evaluated for the last checkpoint and, with a validation split, for the
  selected one (restored from its checkpoint): {'last', 'best', 'selected'}, each
  {'step', 'val', 'test'} with per-class results ('best' None without selection)."""
  eval_step, eval_fn = eval_steps  # compiled for `state`; and to compile for another phase's
  if ckpt.select is None:  # the periodic evaluation ran on the test split
    last = dict(step=last_eval.step, val=None, test=last_eval.as_result())
    return dict(last=last, best=None, selected=last)
  step = last_eval.step
  last_test = evaluate(eval_step, state, test_data, step, class_names)
  log.write(step, 'test', last_test.metrics)
  last = dict(step=step, val=last_eval.as_result(), test=last_test.as_result())
  best_step = ckpt.best_step()
  best_state = None
  if best_step is not None and best_step != step:
    try:
      best_state = runner.place_state(ckpt.restore(best_step, abstract_state(best_step)))
    except Exception as e:  # noqa: BLE001 (orbax raises many kinds for a damaged file)
      if jax.process_index() == 0:
        print(f'warning: the selected checkpoint of step {best_step} cannot be read '
              f'({checkpoint.damage_reason(e)}); the last checkpoint is reported instead. Move '
              f'{ckpt.directory}/{best_step} away to select among the others', file=sys.stderr,
              flush=True)
  if best_state is None:
    best = dict(last)
  else:
    if jax.tree.structure(best_state) != jax.tree.structure(state):  # an earlier phase's
      eval_step = runner.compile_eval(eval_fn, best_state)
    best = dict(step=best_step,
                val=evaluate(eval_step, best_state, val_data, best_step, class_names).as_result(),
                test=evaluate(eval_step, best_state, test_data, best_step,
                              class_names).as_result())
  if jax.process_index() == 0:
    metric = ckpt.select[0]
    print(f'selected step {best["step"]} (validation {metric}={best["val"][metric]:.4g}; at '
          f'the last step {step}: {last["val"][metric]:.4g}); test accuracy '
          f'{best["test"]["accuracy"]:.4g} (last: {last["test"]["accuracy"]:.4g})', flush=True)
  return dict(last=last, best=best, selected=best)


_CONFIG = flags.DEFINE_string(
    'config', None, 'Experiment config file[:arg] (Python, with get_config); set any of its keys '
    'with --config.KEY=VALUE after it.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, results.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0; joins a jax.distributed job.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with what the environment '
    '(TPU VM, SLURM) provides.')
_FRESH = flags.DEFINE_bool(
    'fresh', False, 'Start over even if the workdir holds checkpoints; the earlier run is '
    'moved to <workdir>/replaced-<time>/, not deleted.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', None, 'Simulate this many CPU devices (testing multi-device code on CPU).')


def _usage_error(message: str) -> None:
  print(f'error: {message} (usage: python -m tljax.train --config=FILE.py[:ARG] '
        '--workdir=DIR [--config.KEY=VALUE ...]; --help lists the flags)', file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage_error(f'unexpected arguments {argv[1:]}')
  console.quiet_terminal(flags.FLAGS['verbosity'].present)
  console.tolerate_lost_output()
  if _CONFIG.value is None or _WORKDIR.value is None:
    _usage_error('--config and --workdir are required')
  try:
    config = config_lib.apply_overrides(
        config_lib.load_config_file(_CONFIG.value, ml_collections.ConfigDict), _OVERRIDES,
        _CONFIG.value)
    if _CPU_DEVICES.value is not None:
      parallel.set_cpu_device_count(_CPU_DEVICES.value)
    parallel.enable_compilation_cache()
    if _COORDINATOR.value or _DISTRIBUTED.value:
      parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value)
    run(config, _WORKDIR.value, fresh=_FRESH.value)
  except UserError as e:
    print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)  # one line, always
    sys.exit(exit_status(e))
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    reason = ' '.join(str(e).split())[:200]
    print(f'error: out of device memory ({reason}); lower data.batch_size (or set '
          'optim.grad_accum_steps), data.image_size or the model size, or use more devices',
          file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:  # a second Ctrl-C
    print(f'error: {e or "interrupted"}: stopped at once without saving; the checkpoints '
          'already complete are kept', file=sys.stderr)
    sys.exit(preemption.ABORT_EXIT_CODE)
  finally:
    preemption.ignore_from_now()  # the outcome is decided: a late signal must not change it


_OVERRIDES: list[tuple[str, str]] = []  # (KEY, TEXT) of each --config.KEY=TEXT, in order


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags, with each `--config.KEY=VALUE` (or `--config.KEY VALUE`) set aside for the
  config: it is applied, by the key's type, to the file's config resolved against the defaults,
  so a key the file does not set can still be overridden. A bad flag is one line."""
  try:
    rest, overrides = cli.split_config_overrides(argv[1:])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  _OVERRIDES.extend(overrides)
  try:
    return flags.FLAGS([argv[0], *rest])
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
