"""The ofstitch exception and warning families.

User errors (a bad folder, bad metadata, a disconnected scan, an unavailable
device) raise :class:`OfstitchError` with a message that says what to do. The
CLI prints that message as one line on stderr and exits with code 2.
"""

from __future__ import annotations


class OfstitchError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class NoImagesError(OfstitchError):
    """The folder holds no usable tile images."""


class MetadataError(OfstitchError):
    """Tile metadata (positions, camera-stage mapping) is missing or malformed."""


class DisconnectedScanError(OfstitchError):
    """The overlap graph of the scan is not connected."""


class DeviceUnavailableError(OfstitchError):
    """The requested compute device cannot be used."""


class OfstitchWarning(UserWarning):
    """Base class of every warning ofstitch emits (a skipped file, a fallback, a recompute)."""
