"""The few exception types a user sees.

Every user mistake raises one of these with a one-line message that names the bad value and what
is allowed. They subclass ``ValueError`` so generic handlers still catch them; the CLI prints the
message without a traceback and exits with status 2.
"""


class SaeJaxError(ValueError):
  """Base class of every user-facing sae_jax error."""


class ConfigError(SaeJaxError):
  """A configuration value is out of range, unknown or inconsistent."""


class DataError(SaeJaxError):
  """Input data has the wrong shape or dtype, is non-finite, or is missing."""


class CheckpointError(SaeJaxError):
  """A saved SAE, train state or model checkpoint is missing, corrupted or incompatible."""


class UnsupportedModelError(SaeJaxError):
  """A model config uses an architecture or option that sae_jax does not implement."""


class Preempted(SystemExit):
  """Raised after a SIGTERM (preemption notice) once the run is checkpointed; exit code 143.

  Rerun the same command with the same workdir to resume exactly where it stopped.
  """

  def __init__(self, message: str):
    super().__init__(143)
    self.message = message

  def __str__(self) -> str:
    return self.message
