"""Errors of the streamer package, all derived from drnn_core.errors.DrnnError."""

from drnn_core.errors import ConfigError, DrnnError

__all__ = ["ConfigError", "DrnnError", "CheckpointError", "KafkaIOError", "ShutdownRequested"]


class CheckpointError(DrnnError):
    """A checkpoint could not be written or read."""


class KafkaIOError(DrnnError):
    """The broker rejected or timed out a request the worker cannot do without."""


class ShutdownRequested(DrnnError):
    """A retry loop gave up because the worker is stopping."""
