"""Transferability scores: how well frozen features (or a source head) suit a target task,
estimated from one forward pass instead of a training run per candidate.

  python -m tljax.transferability --config=CONFIG --workdir=DIR [--config.a.b=value ...]
      [--cuts all|STAGE,...] [--models ZOO,...] [--per-class N] [--shots K]
      [--sweep ABLATION_DIR]

Every score is a pure function of host arrays: `features` (examples x dimensions, pooled),
integer `labels` (0..C-1), and for LEEP and NCE the source model's class probabilities on the
target examples. Higher is better for all five. They rank candidates of one task; their values
are not comparable across tasks or datasets. The command (tljax.score_cuts) computes the
features at every stage cut of a model in one pass, scores them, and with --sweep compares the
ranking with the accuracies a finished `tljax.ablate` sweep measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg

from tljax.errors import UserError

# LogME's fixed-point iteration stops when alpha and beta both change by less than this
# (relative), or after LOGME_MAX_ITERATIONS; it usually takes 3-20 iterations. Where the
# evidence is largest with no weights at all (features that say nothing of a class), alpha grows
# without bound: past LOGME_ALPHA_LIMIT times the largest beta * sigma the weights are off and
# the evidence is within 1e-9 of its limit, so that class stops there.
LOGME_TOLERANCE = 1e-8
LOGME_MAX_ITERATIONS = 200
LOGME_ALPHA_LIMIT = 1e9
# Features that fit a class exactly would drive the noise precision beta to infinity (and the
# evidence with it); it stops at this (a noise variance of 1e-9 of a one-hot target's).
LOGME_BETA_LIMIT = 1e9
# Larger features are refused: their squares overflow (float32 models stay far below).
MAX_FEATURE_MAGNITUDE = 1e30
# The ridge probe's regularisation strengths; leave-one-out error on the fitting examples picks
# one (features are centred and scaled to unit mean norm first, so the grid is scale-free).
RIDGE_L2_GRID = tuple(10.0 ** e for e in range(-4, 4))


class ScoreError(UserError):
  """Features, labels or probabilities a score cannot be computed on."""


def _checked_labels(labels: Sequence[int] | np.ndarray, examples: int | None = None
                    ) -> np.ndarray:
  """Labels as int64, refused (one message naming why) when a score cannot rank with them: not
  integers in 0..C-1, one class only, or fewer examples than classes."""
  y = np.asarray(labels)
  if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
    raise ScoreError(f'labels must be a 1-D array of integer classes, got shape {y.shape} '
                     f'and dtype {y.dtype}')
  y = y.astype(np.int64)
  if examples is not None and len(y) != examples:
    raise ScoreError(f'{examples} feature rows but {len(y)} labels; give one label per example')
  if len(y) and y.min() < 0:
    raise ScoreError(f'labels must be classes 0..C-1; found {int(y.min())}')
  present = np.unique(y)
  if len(present) < 2:
    which = f' (class {int(present[0])})' if len(present) else ''
    raise ScoreError(f'the split has examples of {len(present)} class{which}: a '
                     'transferability score compares classes, so it needs at least two')
  classes = int(y.max()) + 1
  if len(y) < classes:
    raise ScoreError(f'the split has {len(y)} examples for {classes} classes: fewer examples '
                     'than classes; score a larger split')
  return y


def _checked_features(features: np.ndarray) -> np.ndarray:
  f = np.asarray(features)
  if f.ndim != 2 or f.shape[1] == 0:
    raise ScoreError(f'features must be examples x dimensions (2-D, at least one dimension), '
                     f'got shape {f.shape}; pool spatial or token axes first')
  if not np.issubdtype(f.dtype, np.number):
    raise ScoreError(f'features must be numbers, got dtype {f.dtype}')
  f = f.astype(np.float64)
  if not np.isfinite(f).all():
    raise ScoreError(f'features hold {int((~np.isfinite(f)).sum())} non-finite values (NaN or '
                     'inf); the model overflowed or its inputs are broken')
  if np.abs(f).max() > MAX_FEATURE_MAGNITUDE:
    raise ScoreError(f'features reach {np.abs(f).max():.3g} in magnitude (more than '
                     f'{MAX_FEATURE_MAGNITUDE:g}); the model overflowed or its inputs are broken')
  return f


def _checked_probabilities(probabilities: np.ndarray, examples: int) -> np.ndarray:
  p = np.asarray(probabilities)
  if p.ndim != 2 or p.shape[0] != examples or p.shape[1] < 1:
    raise ScoreError(f'source probabilities must be examples x source classes for {examples} '
                     f'examples, got shape {p.shape}')
  p = p.astype(np.float64)
  if not np.isfinite(p).all() or (p < 0).any() or np.abs(p.sum(1) - 1).max() > 1e-3:
    raise ScoreError('source probabilities must be finite, non-negative rows summing to 1 '
                     '(a softmax of the source head), not logits')
  return p


def _one_hot(labels: np.ndarray, classes: int | None = None) -> np.ndarray:
  classes = classes or int(labels.max()) + 1
  return (labels[:, None] == np.arange(classes)[None]).astype(np.float64)


def _spectrum(f: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The squared singular values sigma of `f` (n x D) and the squared projections of the
  targets on its left singular vectors, from the smaller Gram matrix (n x n or D x D): the same
  numbers as an SVD, several times faster for 1,280 dimensions."""
  if len(f) <= f.shape[1]:
    sigma, u = np.linalg.eigh(f @ f.T)
    return np.maximum(sigma, 0.0), (u.T @ targets) ** 2
  sigma, v = np.linalg.eigh(f.T @ f)
  kept = sigma > 1e-12 * max(sigma.max(), np.finfo(np.float64).tiny)  # null directions: no z
  projected = v[:, kept].T @ (f.T @ targets)  # s_i z_i
  return sigma[kept], projected ** 2 / sigma[kept][:, None]


def logme(features: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
  """LogME (You et al., ICML 2021): the log marginal evidence per example of a Bayesian linear
  regression from the features to each class's one-hot target, maximised over its prior
  precision alpha and noise precision beta, averaged over the classes present.

  Per class, with F = U S V^T (thin SVD, sigma = S^2) and z = U^T y, the paper's fixed point
  gamma = sum(beta sigma / (alpha + beta sigma)), alpha <- gamma / m^T m,
  beta <- (n - gamma) / |F m - y|^2 (m the posterior mean) is iterated for all classes at once,
  until alpha and beta change by less than LOGME_TOLERANCE (relative); the evidence is then
  evaluated at the final alpha and beta. Cost: one SVD, O(n D min(n, D)), then
  O(C min(n, D)) per iteration.
  """
  f = _checked_features(features)
  y = _checked_labels(labels, len(f))
  n, dims = f.shape
  targets = _one_hot(y)[:, np.unique(y)]
  sigma, z2 = _spectrum(f, targets)
  sigma = sigma[:, None]  # (k, 1)
  outside = np.maximum((targets ** 2).sum(0) - z2.sum(0), 0.0)  # energy outside F's span
  alpha, beta = np.ones(targets.shape[1]), np.ones(targets.shape[1])

  def terms(alpha, beta):
    denom = alpha + beta * sigma
    mm = (beta ** 2 * sigma * z2 / denom ** 2).sum(0)  # m^T m
    residual = (alpha ** 2 * z2 / denom ** 2).sum(0) + outside  # |F m - y|^2
    gamma = (beta * sigma / denom).sum(0)
    return denom, mm, residual, gamma

  tiny = np.finfo(np.float64).tiny
  moving = np.ones(len(alpha), bool)
  for _ in range(LOGME_MAX_ITERATIONS):
    _, mm, residual, gamma = terms(alpha, beta)
    new_beta = np.where(moving, np.minimum((n - gamma) / np.maximum(residual, tiny),
                                           LOGME_BETA_LIMIT), beta)
    # Past the limit (or with no weight to give: constant features) alpha stops at it.
    limit = LOGME_ALPHA_LIMIT * np.maximum(new_beta * sigma.max(initial=0.0), 1.0)
    new_alpha = np.where(moving, np.minimum(
        np.divide(gamma, mm, out=np.full_like(gamma, np.inf), where=mm > 0), limit), alpha)
    settled = (np.abs(new_alpha - alpha) <= LOGME_TOLERANCE * alpha) & (
        np.abs(new_beta - beta) <= LOGME_TOLERANCE * beta)
    switched_off = new_alpha >= limit
    alpha, beta = new_alpha, new_beta
    moving &= ~(settled | switched_off)
    if not moving.any():
      break
  _, mm, residual, _ = terms(alpha, beta)
  # D/2 log alpha - 1/2 log|A| (A = alpha I + beta F^T F), in a form exact for a large alpha.
  prior_terms = -np.log1p(beta * sigma / alpha).sum(0) / 2
  evidence = (n / 2 * np.log(beta) - n / 2 * math.log(2 * math.pi) - beta / 2 * residual
              - alpha / 2 * mm + prior_terms)
  return float((evidence / n).mean())


def h_score(features: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
  """H-score (Bao et al., ICIP 2019), with the shrinkage covariance of Ibrahim et al. (2022):
  tr(Sigma_f^-1 (1 - a) Sigma_g), where Sigma_f is the Ledoit-Wolf estimate of the features'
  covariance (shrinkage a towards a scaled identity; the plain sample covariance is singular
  when there are fewer examples than dimensions) and Sigma_g the covariance of the
  class-conditional means. How much of the features' variance separates the classes.
  Cost: O(n D^2 + D^3).
  """
  from sklearn.covariance import LedoitWolf

  f = _checked_features(features)
  y = _checked_labels(labels, len(f))
  f = f - f.mean(0)
  f = f / max(np.abs(f).max(), np.finfo(np.float64).tiny)  # the score is scale-free
  estimate = LedoitWolf(assume_centered=True).fit(f)
  classes = np.unique(y)
  means = np.stack([f[y == c].mean(0) for c in classes])  # (C, D); they average to 0
  weights = np.array([(y == c).mean() for c in classes])
  # tr(Sigma_f^-1 Sigma_g) with Sigma_g = sum_c w_c mu_c mu_c^T is sum_c w_c mu_c^T Sigma_f^-1
  # mu_c: C right-hand sides, not D. The shrunk covariance is positive definite unless the
  # features are constant (zero covariance, a score of 0 by least squares).
  try:
    solved = scipy.linalg.solve(estimate.covariance_, means.T, assume_a='pos')
  except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
    solved = np.linalg.lstsq(estimate.covariance_, means.T, rcond=None)[0]
  return float((1 - estimate.shrinkage_) * (weights * (means.T * solved).sum(0)).sum())


def leep(source_probabilities: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
  """LEEP (Nguyen et al., ICML 2020): the mean log-likelihood of the target labels under the
  "expected empirical predictor", the source head's class probabilities mapped to target
  classes through the empirical P(target | source class). 0 when the source head already
  predicts the target labels perfectly; lower is worse. Cost: O(n Z C).
  """
  y = _checked_labels(labels)
  theta = _checked_probabilities(source_probabilities, len(y))
  joint = _one_hot(y).T @ theta / len(y)  # P(y, z), C x Z
  source = joint.sum(0)  # P(z)
  conditional = np.divide(joint, source, out=np.zeros_like(joint), where=source > 0)
  expected = (theta @ conditional.T)[np.arange(len(y)), y]
  return float(np.log(np.maximum(expected, np.finfo(np.float64).tiny)).mean())


def nce(source_probabilities: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
  """NCE (Tran et al., ICCV 2019): the negative conditional entropy -H(Y | Z) of the target
  labels Y given the source head's hard labels Z (its argmax), from their empirical joint
  distribution. 0 when Z determines Y; in nats. Cost: O(n Z + Z C).
  """
  y = _checked_labels(labels)
  theta = _checked_probabilities(source_probabilities, len(y))
  z = theta.argmax(1)
  joint = np.zeros((theta.shape[1], int(y.max()) + 1))
  np.add.at(joint, (z, y), 1.0)
  joint /= len(y)
  source = joint.sum(1, keepdims=True)
  ratio = np.divide(joint, source, out=np.ones_like(joint), where=joint > 0)
  return float((joint * np.log(ratio)).sum())


def few_shot_split(labels: np.ndarray, shots: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(fit, held-out) example indices: `shots` of every class drawn with `seed`, and the rest."""
  y = _checked_labels(labels)
  if shots < 1:
    raise ScoreError(f'shots={shots}: the ridge probe needs at least 1 example per class')
  counts = np.bincount(y)
  short = [c for c in np.unique(y) if counts[c] <= shots]
  if short:
    raise ScoreError(f'the ridge probe fits {shots} example(s) per class and tests on the rest, '
                     f'but class(es) {[int(c) for c in short]} have at most {shots}; lower the '
                     'shots or score a larger split')
  rng = np.random.default_rng(seed)
  fit = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False)
                                for c in np.unique(y)]))
  return fit, np.setdiff1d(np.arange(len(y)), fit)


def ridge_probe(features: np.ndarray, labels: Sequence[int] | np.ndarray, shots: int,
                seed: int = 0) -> float:
  """Few-shot linear probe in closed form, after big_vision's few-shot evaluator: ridge
  regression from the features to +-1 class targets, fitted on `shots` examples per class
  (drawn with `seed`) and scored by accuracy on all the other examples. The features are
  centred and scaled by the fitting examples' statistics; the L2 strength is the one of
  RIDGE_L2_GRID with the least leave-one-out squared error on the fitting examples (closed form
  from one eigendecomposition). Cost: O(m^2 D + m^3) for m = shots x C fitting examples.
  """
  f = _checked_features(features)
  y = _checked_labels(labels, len(f))
  fit, held_out = few_shot_split(y, shots, seed)
  mean = f[fit].mean(0)
  x = f - mean
  scale = np.sqrt((x[fit] ** 2).sum(1).mean())
  x = x / (scale if scale > 0 else 1.0)
  targets = 2 * _one_hot(y)[fit] - 1
  offset = targets.mean(0)
  kernel = x[fit] @ x[fit].T
  values, vectors = np.linalg.eigh(kernel)
  values = np.maximum(values, 0.0)
  projected = vectors.T @ (targets - offset)
  best = None
  for l2 in RIDGE_L2_GRID:
    shrink = values / (values + l2)
    fitted = vectors @ (shrink[:, None] * projected)
    leverage = (vectors ** 2 * shrink).sum(1)
    loo = ((targets - offset - fitted) / (1 - np.minimum(leverage, 1 - 1e-9))[:, None]) ** 2
    if best is None or loo.sum() < best[0]:
      best = (loo.sum(), l2)
  dual = vectors @ (projected / (values + best[1])[:, None])  # (K + l2 I)^-1 (Y - offset)
  predicted = (x[held_out] @ x[fit].T @ dual + offset).argmax(1)
  return float((predicted == y[held_out]).mean())


FEATURE_SCORES = dict(logme=logme, h_score=h_score)
SOURCE_SCORES = dict(leep=leep, nce=nce)
METHODS = ('logme', 'h_score', 'ridge', 'leep', 'nce')


def main(argv: Sequence[str] | None = None) -> None:
  import sys
  try:
    from tljax import score_cuts
  except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing was written
    print('error: interrupted before anything was written', file=sys.stderr)
    sys.exit(130)
  score_cuts.main(argv)


if __name__ == '__main__':
  main()
