"""The exceptions a run ends with: bad user input (its message names the key, path or file),
and preemption."""


class UserError(ValueError):
  """Input the user can fix; the CLI prints its message as one line instead of a traceback."""


# The exit status of a preempted run that saved its checkpoint: "temporary failure, run again"
# (sysexits.h EX_TEMPFAIL). SLURM scripts and TPU VM wrappers requeue on it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):  # noqa: N818 (a request to stop, not a failure)
  """SIGTERM arrived; the checkpoint of `step` is complete and the same command resumes."""

  def __init__(self, step: int, directory: str):
    super().__init__(f'preempted: checkpoint of step {step} written to {directory}; run the '
                     'same command to resume')
    self.step = step
