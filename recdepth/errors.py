"""One exception type per domain, so callers and the CLI can report a single clear line."""


class RecdepthError(Exception):
    """Base class: its message is shown to the user as one line, without a traceback."""


class ConfigError(RecdepthError, ValueError):
    """A config field has a bad value; the message names the field, the value and what is valid."""


class DataError(RecdepthError):
    """Input or prepared data is missing, malformed or inconsistent; the message names the file."""


class CheckpointError(RecdepthError):
    """A checkpoint cannot be written, found or loaded into this run."""


class DistributedError(RecdepthError):
    """Process-group setup or a collective failed or disagrees across ranks."""


def require(cond: bool, field: str, value, valid: str, exc: type[RecdepthError] = ConfigError) -> None:
    """Raise `exc` naming `field`, the bad `value` and what would be `valid` unless `cond` holds."""
    if not cond:
        raise exc(f"{field}={value!r} is invalid: expected {valid}")


class TrainingError(RecdepthError):
    """Training stopped because it cannot continue usefully (non-finite steps, loss guardrail)."""
