"""Classical baselines fitted on a config's splits, so a sweep shows what transfer buys.

`baseline='tfidf_logreg'` in a text config makes `tljax.train` (and so `tljax.ablate`) fit
TF-IDF features + logistic regression (scikit-learn) on the same training split, k-per-class
subset and validation split as the network runs, instead of training the model. It writes
config.json and a results.json of the same form (test scores of the validation-selected fit,
per-class results), so the sweep tables put it in a row beside them. Seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from tljax import class_metrics
from tljax import workdir as workdir_lib
from tljax.data import pipeline, sources
from tljax.errors import UserError

# Inverse regularisation strengths tried; the validation split picks one. Without a validation
# split C=10 (the middle of the grid, a common choice for TF-IDF features) is used.
C_GRID = (1.0, 10.0, 100.0)
C_WITHOUT_VALIDATION = 10.0
SELECT_METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1', 'loss')


def _vectorizer():
  from sklearn.feature_extraction.text import TfidfVectorizer
  # Words and word pairs, sublinear term frequency: the usual strong setting for topic data.
  return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1,
                         strip_accents='unicode')


def _split(source: sources.Source, split: str, chosen: np.ndarray | None
           ) -> tuple[list[str], np.ndarray]:
  texts, labels = source.texts(split), source.labels(split)
  if chosen is not None:
    texts, labels = [texts[i] for i in chosen], labels[chosen]
  return texts, labels


def _evaluate(classifier, features, labels: np.ndarray, num_classes: int,
              class_names: list[str] | None) -> dict[str, Any]:
  """The training run's evaluation keys: loss, accuracy, balanced accuracy, macro F1, per-class
  results and the confusion matrix."""
  probabilities = np.zeros((len(labels), num_classes))
  probabilities[:, classifier.classes_] = classifier.predict_proba(features)
  predicted = probabilities.argmax(1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  loss = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean()
  names = class_names if class_names and len(class_names) == num_classes else None
  scalars, details = class_metrics.summarize(confusion, names)
  return dict(loss=float(loss), accuracy=float((predicted == labels).mean()), **scalars,
              examples=len(labels), **details)


def fit_tfidf_logreg(config: ml_collections.ConfigDict, source: sources.Source
                     ) -> dict[str, Any]:
  """Fits on the training split (its k-per-class subset), selects C on the validation split by
  data `select.metric`, and evaluates on the eval split; returns the results.json fields."""
  from sklearn.linear_model import LogisticRegression

  data, num_classes = config.data, config.model.num_classes
  start = time.time()
  train_texts, train_labels = _split(source, data.train_split,
                                     pipeline.subset_indices(source, data.train_split, data))
  vectorizer = _vectorizer()
  train_features = vectorizer.fit_transform(train_texts)
  val_split = sources.validation_split(data)
  candidates = []
  for c in (C_GRID if val_split else (C_WITHOUT_VALIDATION,)):
    classifier = LogisticRegression(C=c, max_iter=2000, random_state=config.seed)
    classifier.fit(train_features, train_labels)
    val = None
    if val_split:
      texts, labels = _split(source, val_split, None)
      val = _evaluate(classifier, vectorizer.transform(texts), labels, num_classes,
                      source.class_names)
    candidates.append((c, classifier, val))
  metric, mode = config.select.metric, config.select.mode or (
      'min' if config.select.metric == 'loss' else 'max')
  if val_split:
    sign = -1 if mode == 'max' else 1
    c, classifier, val = min(candidates, key=lambda item: sign * item[2][metric])
  else:
    c, classifier, val = candidates[0]
  texts, labels = _split(source, data.eval_split, None)
  test = _evaluate(classifier, vectorizer.transform(texts), labels, num_classes,
                   source.class_names)
  selected = dict(step=1, val=val, test=test, C=c)
  return dict(
      final_step=1, baseline=config.baseline, eval=test, selected_step=1, last=selected,
      best=selected if val_split else None, C=c,
      validation=None if val_split is None else dict(
          split=data.val_split, examples=source.num_examples(val_split),
          select=dict(metric=metric, mode=mode)),
      wall_time_s=time.time() - start, median_step_time_s=None, preset=config.baseline,
      pretrained=None, frozen_stages=None, examples_per_class=data.examples_per_class,
      train_examples=len(train_labels),
      trainable_params=int(classifier.coef_.size + classifier.intercept_.size),
      vocabulary=len(vectorizer.vocabulary_), modality=source.modality)


def run(config: ml_collections.ConfigDict, workdir: str, source: sources.Source | None,
        fresh: bool) -> dict[str, Any]:
  """tljax.train for `config.baseline`: checks the data, fits, writes config.json and
  results.json (a finished workdir with the same config is left as it is)."""
  source = sources.with_validation(source or sources.make_source(config.data, 'text'),
                                   config.data)
  if source.modality != 'text':
    raise UserError(f'baseline={config.baseline!r} reads text, but data.source='
                    f'{config.data.source!r} gives {source.modality} examples')
  pipeline.check_splits(source, config.data, config.model.num_classes)
  if sources.validation_split(config.data) and config.select.metric not in SELECT_METRICS:
    raise UserError(f'select.metric={config.select.metric!r} is not a score of the '
                    f'{config.baseline} baseline; use one of {list(SELECT_METRICS)}')
  config_json = config.to_json_best_effort(indent=2)
  workdir_lib.check_writable(workdir)
  earlier = None if fresh else workdir_lib.read_results(workdir)
  if earlier is not None:
    changed = workdir_lib.config_differences(workdir_lib.saved_config(workdir) or {},
                                             json.loads(config_json))
    if changed:
      raise workdir_lib.WorkdirError(
          f'{workdir} holds a finished run with a different config ({"; ".join(changed)}); '
          'use another workdir or pass --fresh')
    print(f'{workdir} already finished: nothing to do (pass --fresh to fit again)', flush=True)
    return earlier
  if not fresh:
    workdir_lib.check_run_files(workdir)
    saved = workdir_lib.saved_config(workdir)
    if saved is not None and not saved.get('baseline'):  # a training run, finished or not
      raise workdir_lib.WorkdirError(
          f'{workdir} holds a training run, not a {config.baseline} baseline; use another '
          'workdir, or pass --fresh to move it aside')
  results = fit_tfidf_logreg(config, source)  # nothing is written until the fit succeeded
  with workdir_lib.lock(workdir):
    if fresh:
      moved = workdir_lib.move_aside(workdir)
      if moved:
        print(f'--fresh: moved the earlier run to {moved}', flush=True)
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), config_json)
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE), results)
  print(f'{config.baseline}: C={results["C"]}, {results["train_examples"]} training texts, '
        f'{results["vocabulary"]:,} features; test accuracy {results["eval"]["accuracy"]:.4g} '
        f'({results["wall_time_s"]:.1f} s)', flush=True)
  return results
