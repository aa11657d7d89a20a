"""Exception types shared by the whole suite.

Every error a user can cause (bad config, missing data package, unknown name) is a
``QbenchError``; the CLI prints its message on one line and exits with code 2.
"""

from __future__ import annotations


class QbenchError(Exception):
    """Base class of user-facing errors: the message is one line and names the culprit."""


class ConfigError(QbenchError):
    """A config value is malformed; the message names the field and the accepted values."""


class DataError(QbenchError):
    """A model or data source is missing or corrupt; the message says what to install."""


class HonestyError(QbenchError):
    """A quantized model does not match the quantization state it claims."""


class NumericalFailure(RuntimeError):
    """A method's linear algebra failed (e.g. a Hessian that stays non positive-definite): not
    a user error, and not a bug; the cell's record gets status ``numerical``."""


class ExportRefused(QbenchError):
    """A quantized layer's format has no exact representation in the requested export format;
    the message names the layer's format and the nearest format that does export."""
