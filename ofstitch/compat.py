"""openflexure-stitch command lines, accepted as they are.

The OpenFlexure Microscope server runs its stitcher as a subprocess with
openflexure-stitch 0.3.1's command line, for example::

    STITCHER --stitching_mode only_stage_stitch IMAGES
    STITCHER --stitching_mode only_correlate --minimum_overlap 0.27 --resize 1 IMAGES
    STITCHER --stitching_mode all --stitch_tiff --minimum_overlap 0.27 --resize 1 IMAGES

:func:`rewrite_argv` turns such a command line into ofstitch's own before it
is parsed, so that ofstitch can be named as the stitcher. It is a pure
function of the argument list:

- an option spelled with underscores (``--output_dir``, ``--stitch_tiff``,
  ``--no-stitch_tiff``) is spelled with hyphens; ``--thresholding_method``
  is ``--thresholding``;
- the reference's mode values (``preview_stitch``, ``stage_stitch``,
  ``only_correlate``) become ofstitch's, and ``only_stage_stitch`` (the
  server's live preview: a registered preview named ``stitched_from_stage.jpg``)
  becomes ``--stitching-mode preview --preview-name stitched_from_stage.jpg``;
- ``--tile_size N|auto`` is dropped: in the reference it only sets the size
  of the chunks the mosaic is composed in (a memory knob, no effect on the
  files), and ofstitch streams the mosaic in bounded memory anyway; ofstitch's
  own ``--tile-size`` (the pyramid tile size) is unchanged, and ``--tile-size
  auto`` means its default;
- ``--format`` values take the usual spellings (``jpg``, ``tif``, ``tiff``,
  ``ome.tif``, ``zarr``, any case), and ``--csm_calibration_width 832.0`` is
  read as 832.

A mode value that is none of these stops with one line that lists the valid
values.

The server reads the stitcher's output line by line into its log:
:class:`ProgressLines` writes progress as plain lines for it (the CLI uses it
whenever stdout is not a terminal).
"""

from __future__ import annotations

from .errors import OfstitchError
from .settings import (
    OUTPUT_FORMAT_ALIASES,
    OUTPUT_FORMATS,
    STITCHING_MODE_ALIASES,
    STITCHING_MODES,
    canonical_choice,
)

# openflexure-stitch 0.3.1's options whose ofstitch spelling differs (beyond '_' -> '-').
# --pad/--no-pad, --resize, --priority and -o are spelled the same.
REFERENCE_OPTIONS = {
    "--output_dir": "--output-dir",
    "--stitching_mode": "--stitching-mode",
    "--show_cached_settings": "--show-cached-settings",
    "--use_cached_settings": "--use-cached-settings",
    "--csm_matrix": "--csm-matrix",
    "--csm_calibration_width": "--csm-calibration-width",
    "--image_count": "--image-count",
    "--thresholding_method": "--thresholding",
    "--max_stage_discrepancy": "--max-stage-discrepancy",
    "--min_peak_quality": "--min-peak-quality",
    "--high_pass_sigma": "--high-pass-sigma",
    "--minimum_overlap": "--minimum-overlap",
    "--corr_mask_radius": "--corr-mask-radius",
    "--stitch_tiff": "--stitch-tiff",
    "--no-stitch_tiff": "--no-stitch-tiff",
    "--stitch_dzi": "--stitch-dzi",
    "--no-stitch_dzi": "--no-stitch-dzi",
}
REFERENCE_TILE_SIZE = "--tile_size"
LEGACY_PREVIEW_MODE = "only_stage_stitch"
LEGACY_PREVIEW_NAME = "stitched_from_stage.jpg"
# Options that take a value, so that a value is never mistaken for an option.
_VALUED = {"-o", "--output-dir", "--stitching-mode", "--device", "--csm-matrix",
           "--csm-calibration-width", "--image-count", "--placement", "--thresholding",
           "--thresholding-method", "--max-stage-discrepancy", "--min-peak-quality",
           "--high-pass-sigma", "--resize", "--minimum-overlap", "--priority",
           "--corr-mask-radius", "--search-margin", "--format", "-f", "--blend",
           "--tiff-compression", "--tile-size", "--cache-dir", "--device-memory", "--workers",
           "--preview-name", "--layout", "--grid", "--grid-order", "--grid-overlap",
           "--settle-time", "--idle-timeout", "--preview-width", "--output"}
HELP_LINE = ("openflexure-stitch 0.3.1's spellings work too (--stitching_mode only_correlate, "
             "--stitch_tiff, --minimum_overlap 0.27, --tile_size auto, ...), so ofstitch can "
             "be the OpenFlexure server's stitcher.")


def _option_name(token: str) -> str:
    """``--stitching_mode`` for ``--stitching_mode`` and ``--stitching_mode=all``."""
    return token.split("=", 1)[0]


def _kebab(name: str) -> str:
    """An option name with ofstitch's spelling."""
    if name in REFERENCE_OPTIONS:
        return REFERENCE_OPTIONS[name]
    if name.startswith("--") and "_" in name:
        return name.replace("_", "-")
    return name


def _mode(value: str) -> list[str]:
    if value == LEGACY_PREVIEW_MODE:
        return ["preview", "--preview-name", LEGACY_PREVIEW_NAME]
    mode = canonical_choice(value, STITCHING_MODES, STITCHING_MODE_ALIASES)
    if mode not in STITCHING_MODES:
        raise OfstitchError(
            f"--stitching-mode must be one of {', '.join(STITCHING_MODES)} (or "
            f"openflexure-stitch's {', '.join(STITCHING_MODE_ALIASES)}, "
            f"{LEGACY_PREVIEW_MODE}), got {value!r}")
    return [mode]


def _reference_tile_size(value: str | None) -> None:
    """Check ``--tile_size``'s value (a positive whole number or 'auto'); it is dropped."""
    if value is not None and value.strip().lower() == "auto":
        return
    try:
        ok = value is not None and int(value) > 0
    except ValueError:
        ok = False
    if not ok:
        raise OfstitchError(f"--tile_size must be a number of pixels or 'auto', got {value!r}")


def _whole(value: str) -> str:
    """'832.0' -> '832' (the reference reads --csm_calibration_width as a float)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else value


def rewrite_argv(args: list[str]) -> list[str]:
    """ofstitch's command line for ``args``, which may use openflexure-stitch's spellings.

    ``args`` starts after the program name; tokens after ``--`` are left alone.

    Raises
    ------
    OfstitchError
        An unknown ``--stitching_mode`` value, or a ``--tile_size`` that is neither a
        number nor 'auto'.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            out.extend(args[i - 1:])
            break
        if not token.startswith("--") and token not in ("-o", "-f"):
            out.append(token)
            continue
        raw_name = _option_name(token)
        inline = token[len(raw_name) + 1:] if "=" in token else None
        if raw_name in (REFERENCE_TILE_SIZE, "--tile-size"):
            value = inline
            if value is None and i < len(args):
                value = args[i]
                i += 1
            if raw_name == REFERENCE_TILE_SIZE:
                _reference_tile_size(value)
                continue
            if value is not None and value.strip().lower() == "auto":
                continue  # ofstitch's default pyramid tile size
            out.extend(["--tile-size"] + ([] if value is None else [value]))
            continue
        name = _kebab(raw_name)
        if name not in _VALUED:
            out.append(name if inline is None else f"{name}={inline}")
            continue
        if inline is not None:
            value = inline
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            out.append(name)  # the parser says the value is missing
            break
        if name == "--stitching-mode":
            out.extend([name, *_mode(value)])
        elif name in ("--format", "-f"):
            out.extend([name, canonical_choice(value, OUTPUT_FORMATS, OUTPUT_FORMAT_ALIASES)])
        elif name == "--csm-calibration-width":
            out.extend([name, _whole(value)])
        else:
            out.extend([name, value])
    return out


class ProgressLines:
    """Progress as plain lines for a log (no escape codes): ``Correlating pairs: 40/120``,
    when a stage starts, about every tenth of it and when it ends.

    ``write`` receives each line.
    """

    STEPS = 10

    def __init__(self, write) -> None:
        self.write = write
        self.shown: dict[str, int] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if total <= 0:
            return
        step = done * self.STEPS // total
        if self.shown.get(label, -1) >= step:
            return
        self.shown[label] = step
        self.write(f"{label}: {done}/{total}")
