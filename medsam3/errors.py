"""Errors that end a stage with a message for the user (the CLI prints it and exits 1)."""


class StageError(RuntimeError):
    """A stage cannot start, or failed as a whole; the message says why."""
