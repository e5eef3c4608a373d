"""Freeze groups: first match wins, every leaf covered, every pattern used, a useful table."""

import numpy as np
import pytest

from tljax import freeze

PARAMS = {'stem': {'conv': {'kernel': np.zeros((3, 3, 3, 4))}, 'bn': {'scale': np.zeros(4)}},
          'stage1': {'conv': {'kernel': np.zeros((3, 3, 4, 8))}},
          'head': {'kernel': np.zeros((8, 2)), 'bias': np.zeros(2)}}


def test_first_match_wins_and_labels_follow_rules():
  groups = freeze.parse_groups([('stem/.*', None), ('head/.*', dict(lr_mult=10.0)),
                                ('.*', {})])
  labels = freeze.flat_paths(freeze.label_tree(PARAMS, groups))
  assert labels == {'stem/conv/kernel': 'frozen', 'stem/bn/scale': 'frozen',
                    'stage1/conv/kernel': 'group2', 'head/kernel': 'group1',
                    'head/bias': 'group1'}


def test_uncovered_parameter_is_named():
  groups = freeze.parse_groups([('stem/.*', None), ('head/.*', {})])
  with pytest.raises(freeze.FreezeError, match='stage1/conv/kernel'):
    freeze.label_tree(PARAMS, groups)


def test_pattern_that_matches_nothing_is_named():
  groups = freeze.parse_groups([('stem/.*', None), ('stage9/.*', None), ('.*', {})])
  with pytest.raises(freeze.FreezeError, match=r"optim.groups\[1\].*stage9"):
    freeze.label_tree(PARAMS, groups)


def test_pattern_shadowed_by_an_earlier_one_counts_as_unused():
  groups = freeze.parse_groups([('.*', {}), ('head/.*', None)])
  with pytest.raises(freeze.FreezeError, match=r'optim.groups\[1\]'):
    freeze.label_tree(PARAMS, groups)


def test_everything_frozen_is_an_error():
  with pytest.raises(freeze.FreezeError,
                     match='every parameter is frozen by optim.groups: nothing would train'):
    freeze.label_tree(PARAMS, freeze.parse_groups([('.*', None)]))


def test_patterns_use_fullmatch():
  groups = freeze.parse_groups([('stem', None), ('.*', {})])  # 'stem' alone matches no path
  with pytest.raises(freeze.FreezeError,
                     match=r"optim.groups\[0\] pattern 'stem' matches no parameter"):
    freeze.label_tree(PARAMS, groups)


@pytest.mark.parametrize('bad,message', [
    ([('(', None)], r"optim.groups\[0\] pattern '\(' is not a regex"),
    ([('.*', {'lr': 1.0})], r"optim.groups\[0\] \('.\*'\) has unknown rule keys \['lr'\]"),
    ([('.*',)], r"optim.groups\[0\] must be a \(regex, rule\) pair, got \('.\*',\)"),
    ([], r'optim.groups is empty')])
def test_malformed_groups_are_rejected(bad, message):
  with pytest.raises(freeze.FreezeError, match=message):
    freeze.parse_groups(bad)


def test_stage_groups_freeze_a_prefix_of_stages():
  stages = ('stem', 'stage1', 'head')
  groups = freeze.parse_groups(freeze.stage_groups(stages, 2))
  labels = freeze.flat_paths(freeze.label_tree(PARAMS, groups))
  assert {p for p, label in labels.items() if label == 'frozen'} == {
      'stem/conv/kernel', 'stem/bn/scale', 'stage1/conv/kernel'}
  with pytest.raises(freeze.FreezeError, match=r"freeze.preset='stages:3' must freeze 0 to 2 "
                                                r"stages of \['stem', 'stage1', 'head'\]"):
    freeze.stage_groups(stages, 3)


def test_frozen_norm_paths_follow_scale_labels():
  groups = freeze.parse_groups([('stem/.*', None), ('.*', {})])
  labels = freeze.label_tree(PARAMS, groups)
  stats = {'stem': {'bn': {'mean': np.zeros(4), 'var': np.ones(4)}}}
  assert freeze.frozen_norm_paths(labels, stats) == frozenset({'stem/bn'})


def test_summary_table_counts_parameters_per_group():
  groups = freeze.parse_groups([('stem/.*', None), ('head/.*', dict(lr_mult=10.0)),
                                ('.*', {})])
  rows = freeze.summary_rows(PARAMS, groups, base_lr=0.01)
  assert [(r['tensors'], r['params'], r['status']) for r in rows] == [
      (2, 3 * 3 * 3 * 4 + 4, 'frozen'), (2, 8 * 2 + 2, 'trainable'),
      (1, 3 * 3 * 4 * 8, 'trainable')]
  assert rows[1]['lr'] == pytest.approx(0.1)
  table = freeze.format_table(rows)
  assert 'stem/.*' in table and 'frozen' in table and '306 trainable' in table
