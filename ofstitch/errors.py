"""The ofstitch exception and warning families.

User errors (a bad folder, bad metadata, a disconnected scan, an unavailable
device) raise :class:`OfstitchError` with a message that says what to do. The
CLI prints that message as one line on stderr and exits with code 2.
"""

from __future__ import annotations


class OfstitchError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class SettingError(OfstitchError, ValueError):
    """A setting has a value it cannot take.

    ``str(error)`` names the Python setting (``resize must be in (0, 1], got 2.0``);
    :meth:`for_cli` names the command-line option instead (``--resize must ...``).
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem

    def for_cli(self) -> str:
        option = {"formats": "format", "thresholding": "thresholding"}.get(
            self.setting, self.setting)
        return f"--{option.replace('_', '-')} {self.problem}"


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
