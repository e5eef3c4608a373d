"""The one error type of the weights package."""

from tljax.errors import UserError


class WeightsError(UserError):
  """A pretrained source that cannot be read, fails its checksum, or does not fit the model."""
