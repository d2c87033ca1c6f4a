"""Exception root of drnn-stream; the streamer package derives its errors from it."""


class DrnnError(Exception):
    """Base class of every error raised by drnn_core and streamer."""


class ConfigError(DrnnError, ValueError):
    """A setting is out of its allowed range or of the wrong type."""


class ModelFormatError(DrnnError, ValueError):
    """A saved model has another format version, shape or layout than expected."""


class ModelShapeError(ModelFormatError):
    """A saved model is readable but has another hidden size or window than the settings."""
