"""Errors a user can fix from the command line.

Each carries one line that says what was wrong and with which value; the CLI prints it and exits 2.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class InitCheckError(Exception):
    """Base class: a problem with what the user asked for, not with this package."""


class SpecError(InitCheckError):
    """The module spec does not name an importable torch.nn.Module subclass."""


class ShapeError(InitCheckError):
    """An input shape cannot be parsed, or the module rejects inputs of that shape."""


class KwargsError(InitCheckError):
    """A --module-kwargs entry cannot be parsed, or the constructor rejects the keyword arguments."""


class DeviceError(InitCheckError):
    """The requested device does not exist or cannot be used."""


class DtypeError(InitCheckError):
    """The dtype is unknown, or the module cannot run in it on the chosen device."""


class OutputError(InitCheckError):
    """An output path has an unsupported suffix or cannot be written."""
