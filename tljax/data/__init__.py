"""Input pipelines: sources (TFDS, folders, arrays), preprocessing and batching."""

from tljax.data import tf_quiet  # noqa: F401  (first: hide accelerators from TF, quiet logs)
