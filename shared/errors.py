"""The exceptions dpfl raises for problems a user can fix.

Every message says what was wrong, the value received, and how to fix it.
"""


class DpflError(Exception):
    """Base class of every error dpfl raises on purpose."""


class ConfigError(DpflError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(DpflError, ValueError):
    """A data file or folder cannot be read, or holds something unexpected."""


class ModelError(DpflError, ValueError):
    """A model directory is missing, incomplete or not the model expected."""


class IncompatibleAdapter(DpflError, ValueError):
    """An adapter does not fit the base model (keys, shapes or fingerprint)."""


class BudgetExhausted(DpflError, RuntimeError):
    """Training would spend more privacy budget than the site allows."""


class StateError(DpflError, RuntimeError):
    """Persistent state (accountant, ledger, checkpoint) cannot be read or written."""
