"""The exceptions a run ends with: bad user input (its message names the key, path or file),
and preemption."""

from __future__ import annotations


class UserError(ValueError):
  """Input the user can fix; the CLI prints its message as one line instead of a traceback."""


# Exit statuses of the command-line tools (the README's table lists them all).
BAD_INPUT_EXIT_CODE = 2  # bad input: checked before anything was written
TRAINING_FAILED_EXIT_CODE = 3  # training started and failed; complete checkpoints are kept


class TrainingFailed(UserError):
  """The run started and could not go on: it diverged, or the disk filled. Checkpoints
  complete before it are kept; the message says what to change before the same command resumes.
  """


def exit_status(error: UserError) -> int:
  """The status a command exits with after printing `error` as its one line."""
  return TRAINING_FAILED_EXIT_CODE if isinstance(error, TrainingFailed) else BAD_INPUT_EXIT_CODE


# The exit status of a preempted run that saved its checkpoint: "temporary failure, run again"
# (sysexits.h EX_TEMPFAIL). SLURM scripts and TPU VM wrappers requeue on it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):  # noqa: N818 (a request to stop, not a failure)
  """SIGTERM or SIGINT arrived; the checkpoint of `step` is complete (or, with `step` None,
  nothing needed saving) and the same command resumes."""

  def __init__(self, step: int | None, message: str):
    super().__init__(message)
    self.step = step

  @classmethod
  def saved(cls, step: int, directory: str) -> Preempted:
    return cls(step, f'preempted: checkpoint of step {step} written to {directory}; run the '
                     'same command to resume')
