"""Exceptions that tell the user what is wrong, where, and how to fix it.

Each class also inherits the builtin a caller would expect (zarr does the same), so
``except ValueError`` still catches a bad manifest.
"""


class FeatstoreError(Exception):
    """Base class: the message is meant for a person and names the file or field."""


class ManifestError(FeatstoreError, ValueError):
    """The manifest (or a CLI override of it) is invalid."""


class BadInputError(FeatstoreError, ValueError):
    """A data file is missing, corrupt, or inconsistent with its index."""


class EncoderNotFoundError(FeatstoreError, FileNotFoundError):
    """No weights could be found for the requested encoder."""


class StoreMismatchError(FeatstoreError, ValueError):
    """An existing feature set was written with another configuration."""


class StoreIncompleteError(FeatstoreError, RuntimeError):
    """A feature set is missing, or was not finished, or fails verification."""


class ProbeError(FeatstoreError, ValueError):
    """A probe cannot run on this dataset (empty split, one class, missing labels)."""
