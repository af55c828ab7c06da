"""Exceptions raised by pyattr. Each message names the problem and the fix."""

from __future__ import annotations


class PyattrError(Exception):
    """Base class of pyattr's own errors."""


class InputError(PyattrError, ValueError):
    """Bad input given to a method, the exporter or the CLI (shape, dtype, target, file)."""


class LayerNotFoundError(PyattrError, KeyError):
    """A layer name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ExportError(PyattrError, RuntimeError):
    """A method/model pair that cannot be turned into one forward-only graph."""
