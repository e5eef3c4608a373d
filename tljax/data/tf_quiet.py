"""Imports TensorFlow for tf.data only: no GPU/TPU memory taken from JAX, less log noise."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], 'GPU')
try:
  tf.config.set_visible_devices([], 'TPU')
except (ValueError, RuntimeError):  # no TPU platform registered in this TF build
  pass
