"""Errors raised for bad input. Each message says what to change."""


class SignRoundError(Exception):
    """Base class: a problem the user can fix; the CLI prints the message and exits non-zero."""


class ConfigError(SignRoundError):
    """A scheme, layer_config or option is invalid."""


class ModelError(SignRoundError):
    """The model path or its weights cannot be used."""


class ExportError(SignRoundError):
    """The output directory or format cannot hold the result."""


class CalibrationError(SignRoundError):
    """The calibration data spec or content cannot be used."""
