"""Exceptions that tell the user what is wrong, where, and how to fix it.

Each class also inherits the builtin a caller would expect (zarr does the same), so
``except ValueError`` still catches a bad manifest.
"""

import errno
from typing import ClassVar


class FeatstoreError(Exception):
    """Base class: the message is meant for a person and names the file or field."""


class ManifestError(FeatstoreError, ValueError):
    """The manifest (or a CLI override of it) is invalid."""


class BadInputError(FeatstoreError, ValueError):
    """A data file is missing, corrupt, or inconsistent with its index."""


class EncoderNotFoundError(FeatstoreError, FileNotFoundError):
    """No weights could be found for the requested encoder."""


class EncoderConfigError(FeatstoreError, ValueError):
    """An encoder's files are there but unusable (not a vision backbone, malformed
    config, weights that do not fit the architecture)."""


class StoreMismatchError(FeatstoreError, ValueError):
    """An existing feature set was written with another configuration."""


class StoreIncompleteError(FeatstoreError, RuntimeError):
    """A feature set is missing, or was not finished, or fails verification."""


class ProbeError(FeatstoreError, ValueError):
    """A probe cannot run on this dataset (empty split, one class, missing labels)."""


class StoreCorruptError(FeatstoreError, ValueError):
    """A feature set's bytes or attributes changed after it was written."""


class CacheUnreachableError(FeatstoreError, OSError):
    """A cache URL cannot be opened (unknown protocol, missing driver, no access)."""


class SchedulerUnreachableError(FeatstoreError, ConnectionError):
    """No dask scheduler answers at the address given to --scheduler."""


class CacheReadOnlyError(FeatstoreError, PermissionError):
    """An extract must write to a cache that this process may only read."""


# What a read-only mount, read-only credentials or a folder without write permission
# answer to a write: reading the cache must go on without it.
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def is_read_only(exc: OSError) -> bool:
    """Whether `exc` says the file system refuses writes (not a full disk, not a bug)."""
    return exc.errno in READ_ONLY_ERRNOS


class StoreBusyError(FeatstoreError, RuntimeError):
    """Another live process is extracting this feature set."""


class Interrupted(FeatstoreError):
    """An extract was stopped by a signal; what was written is kept and resumable."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequested(BaseException):
    """Raised by the CLI's SIGINT/SIGTERM handler; a BaseException like KeyboardInterrupt.

    A handler's exception is lost when the signal lands in a finalizer (`__del__`) or a
    weakref callback: Python prints "Exception ignored" and carries on. So the handler
    also records the signal in `pending`, and the extract's safe points call `check`.
    """

    pending: ClassVar[int | None] = None

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @classmethod
    def check(cls) -> None:
        """Raise for a signal received since the handler was installed, if any."""
        if cls.pending is not None:
            raise cls(cls.pending)


class FeatureOverflowError(FeatstoreError, FloatingPointError):
    """The encoder gave NaN/Inf features (float16 storage overflows): store float32."""


class DataAbsentWarning(UserWarning):
    """A dataset's data folder is absent: its feature set was found by its recorded
    identity, and the data's fingerprint could not be checked."""


class ChunkChecksumError(ValueError):
    """A chunk's bytes fail their crc32c (raised by the store's codec while decoding).

    Raised deep inside zarr, where the set is unknown: the store (`FeatureSet.verify`)
    and the probes catch it by this type and raise a `StoreCorruptError` naming the set
    and the fix (verify, then extract --repair).
    """
