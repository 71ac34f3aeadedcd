"""Typed settings, one docstring per field, shared by the library and the CLI.

:class:`CorrelationSettings` holds what changes a pair's correlation result; it
is serialised to key the correlation cache. :class:`StitchSettings` holds the
rest. The ``help`` metadata of each field is the text the CLI shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from .errors import SettingError
from .layout import Grid

StitchingMode = Literal["all", "preview", "stage", "only-correlate"]
Thresholding = Literal["automatic", "manual"]
Priority = Literal["time", "memory"]

# Each choice set is spelled here once; the CLI's choices and the modules that use
# them take it from here.
STITCHING_MODES = ("all", "preview", "stage", "only-correlate")
OUTPUT_FORMATS = ("jpeg", "ome-tiff", "dzi", "ome-zarr", "pyramid-tiff")
BLENDS = ("none", "feather")
TIFF_COMPRESSIONS = ("jpeg", "deflate", "lzw")
NGFF_VERSIONS = ("0.4", "0.5")
PLACEMENT_METHODS = ("robust", "reference")
THRESHOLDING_METHODS = ("automatic", "manual")
PRIORITIES = ("time", "memory")
DEVICES = ("cpu", "cuda", "auto")


MIN_RESIZE = 0.01  # below this no tile of any size keeps enough pixels to correlate
MAX_HIGH_PASS_SIGMA = 1e4

# Other spellings of the choices above that the command line accepts (in any case):
# openflexure-stitch's mode names, and the format names ASHLAR and Fiji users type.
STITCHING_MODE_ALIASES = {"preview_stitch": "preview", "stage_stitch": "stage",
                          "only_correlate": "only-correlate"}
OUTPUT_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "ome-tiff", "tiff": "ome-tiff",
                         "ome.tif": "ome-tiff", "ome.tiff": "ome-tiff", "ome-tif": "ome-tiff",
                         "ometiff": "ome-tiff", "zarr": "ome-zarr", "ome.zarr": "ome-zarr",
                         "omezarr": "ome-zarr"}


def canonical_choice(value: str, choices: tuple[str, ...], aliases: dict[str, str]) -> str:
    """``value`` as one of ``choices`` when it is one of them or of their ``aliases`` (any
    case); otherwise ``value`` unchanged, for the caller's error to list the choices."""
    key = str(value).strip().lower()
    if key in choices:
        return key
    return aliases.get(key, value)


def _help(text: str) -> dict:
    return {"help": text}


def _check(setting: str, value: object, *, allowed: str, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False,
           integer: bool = False) -> None:
    """Raise :class:`SettingError` unless ``value`` is a finite number in range (NaN,
    infinities, booleans and text never are); ``allowed`` says what is."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (not integer or v == int(v))
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        raise SettingError(setting, f"must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class CorrelationSettings:
    """Settings that change the result of correlating a pair; they key the cache."""

    pad: bool = field(default=True, metadata=_help(
        "Zero-pad tiles to twice their size before correlating, which removes the "
        "wrap-around ambiguity of FFT correlation. --no-pad uses a quarter of the "
        "memory and breaks the ambiguity by comparing the candidate overlaps."))
    resize: float = field(default=1.0, metadata=_help(
        "Scale factor in (0, 1] applied to tiles before correlating. Smaller is "
        "faster (JPEG tiles are decoded at reduced size) but less reliable."))
    high_pass_sigma: float = field(default=10.0, metadata=_help(
        "Strength of the Gaussian high-pass filter applied in Fourier space: the "
        "standard deviation, in FFT pixels, of the Gaussian removed. Larger removes "
        "more of the smooth background (uneven illumination). Try this first if "
        "tiles are badly placed."))
    search_margin: float = field(default=0.1, metadata=_help(
        "Correlate only the overlap the stage predicts, plus this margin for stage "
        "error (a fraction of the tile's longer side, at least 16 px), instead of whole "
        "zero-padded tiles: several times faster, in less memory. A shift further than "
        "the margin from the stage's prediction is missed there; robust placement then "
        "searches that pair again around the stage model's prediction, or places it "
        "through its neighbours or by the stage, and says so. 0 correlates whole tiles "
        "and finds any shift, as openflexure-stitching does: try it when the stage is "
        "off by more than the margin."))
    corr_mask_radius: float | None = field(default=None, metadata=_help(
        "Only look for the correlation peak within this radius (full-resolution "
        "pixels) of the shift predicted by the stage. Default: no restriction."))

    def __post_init__(self) -> None:
        # Canonical types, so that equal settings give the same cache key (10 == 10.0).
        object.__setattr__(self, "pad", bool(self.pad))
        object.__setattr__(self, "resize", float(self.resize))
        object.__setattr__(self, "high_pass_sigma", float(self.high_pass_sigma))
        object.__setattr__(self, "search_margin", float(self.search_margin))
        if self.corr_mask_radius is not None:
            object.__setattr__(self, "corr_mask_radius", float(self.corr_mask_radius))
        _check("resize", self.resize, low=MIN_RESIZE, high=1.0,
               allowed=f"in [{MIN_RESIZE}, 1]")
        _check("high_pass_sigma", self.high_pass_sigma, low=0.0, high=MAX_HIGH_PASS_SIGMA,
               allowed=f"between 0 and {MAX_HIGH_PASS_SIGMA:g} (FFT pixels)")
        _check("search_margin", self.search_margin, low=0.0, high=1.0, high_open=True,
               allowed="in [0, 1) (a fraction of the tile size)")
        if self.corr_mask_radius is not None:
            _check("corr_mask_radius", self.corr_mask_radius, low=0.0, low_open=True,
                   allowed="a positive number of pixels")

    def key(self) -> str:
        """A canonical JSON string of the settings, used as the cache key."""
        return json.dumps(asdict(self), sort_keys=True)

    def non_default(self) -> dict:
        """The fields that differ from the defaults (for ``--show-cached-settings``)."""
        default = CorrelationSettings()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_key(cls, key: str) -> CorrelationSettings:
        """Rebuild settings from :meth:`key` output."""
        data = json.loads(key)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class StitchSettings:
    """Every setting of a stitch run. ``correlation`` keys the cache."""

    correlation: CorrelationSettings = field(default_factory=CorrelationSettings)
    minimum_overlap: float | None = field(default=None, metadata=_help(
        "Minimum overlap, as a fraction of the tile area predicted from the stage "
        "positions, for two tiles to be correlated. Default: 0.2, or half the scan's "
        "nominal overlap when 0.2 would leave tiles unconnected (0.05 for a grid of "
        "10% overlap)."))
    csm_matrix: tuple[tuple[float, float], tuple[float, float]] | None = field(
        default=None, metadata=_help(
            "Camera-to-sample (image-to-stage displacement) matrix, as "
            "'[[a, b], [c, d]]', overriding the one in the images' metadata. Without "
            "either, stage coordinates are taken to be pixels."))
    csm_calibration_width: int | None = field(default=None, metadata=_help(
        "Width in pixels of the images the CSM was calibrated on; the matrix is "
        "rescaled to the tiles' width. Default: for a matrix from the metadata, the "
        "width it records, or 832 for OpenFlexure images that do not; a --csm-matrix "
        "is used as given. 0 leaves the matrix unscaled."))
    layout: str | None = field(default=None, metadata=_help(
        "A Fiji layout file (TileConfiguration.txt, TileConfiguration.registered.txt, "
        "'name.tif; ; (x, y)' lines in pixels) giving the tile positions, instead of "
        "the tiles' metadata and names. A TileConfiguration[.registered].txt beside the "
        "tiles is read without it."))
    grid: Grid | None = field(default=None, metadata=_help(
        "Place the tiles on a ROWSxCOLS grid (such as 3x4), in natural file-name order "
        "(2.tif before 10.tif), as Fiji's Grid/Collection stitching does: for tiles whose "
        "names hold grid indices or a sequence number."))
    image_count: int | None = field(default=None, metadata=_help(
        "Use only the first N images after sorting by capture time (for trying "
        "settings on part of a scan)."))
    placement: str = field(default="robust", metadata=_help(
        "How tiles are placed. 'robust' (the default): each pair's candidate peaks "
        "are scored by the normalised cross-correlation of the overlap and trusted "
        "when they beat what non-overlapping tiles of this scan score by chance; "
        "rejected pairs are searched again near the fitted stage model; pairs that "
        "break loops are dropped; islands are placed by the stage. 'reference': the "
        "threshold search of OpenFlexure Stitching (--thresholding, "
        "--min-peak-quality, --max-stage-discrepancy; giving any of these selects "
        "it)."))
    thresholding: Thresholding = field(default="automatic", metadata=_help(
        "With --placement reference (chosen by 'manual'): how pairs are accepted: "
        "'automatic' searches peak-quality and "
        "stage-discrepancy thresholds for the smallest RMS error; 'manual' writes "
        "stitching_correlations.png and asks for the two thresholds."))
    min_peak_quality: float | None = field(default=None, metadata=_help(
        "Hard lower limit (0-1) on a pair's peak quality: the fraction of the "
        "correlation below 90% of its range (selects --placement reference). Default: "
        "chosen automatically."))
    max_stage_discrepancy: float | None = field(default=None, metadata=_help(
        "Hard upper limit, in pixels, on the disagreement between a pair's "
        "correlation shift and its stage-predicted shift (selects --placement "
        "reference). Default: chosen automatically."))
    priority: Priority = field(default="time", metadata=_help(
        "'time' keeps decoded tiles in memory while they are still needed; "
        "'memory' uses smaller batches and re-reads tiles instead."))
    stitching_mode: StitchingMode = field(default="all", metadata=_help(
        "'all': correlate, place and write the full mosaic and previews; "
        "'preview': correlate and place, write only the 1000 px preview; "
        "'stage': write a mosaic from stage positions alone; "
        "'only-correlate': fill the correlation cache and stop."))
    formats: tuple[str, ...] = field(default=("jpeg",), metadata=_help(
        "Format of the full-resolution mosaic; repeat the option for several. 'jpeg' "
        "(the default; at most 65,535 px per side), 'ome-tiff' (tiled pyramidal "
        "OME-TIFF for QuPath, Fiji/Bio-Formats, napari), 'dzi' (Deep Zoom pyramid "
        "plus viewer.html, a web page that shows it), 'ome-zarr' (NGFF multiscale "
        "image for napari and ome-zarr) or 'pyramid-tiff' (8-bit tiled pyramidal TIFF "
        "for OpenSlide and slide viewers). OME-TIFF and OME-Zarr keep the tiles' data "
        "type and channels; the others are 8-bit renderings."))
    blend: str = field(default="none", metadata=_help(
        "How overlapping tiles are combined: 'none' takes each pixel from the tile "
        "whose centre is nearest (sharp, the OpenFlexure Stitching look); 'feather' "
        "averages the tiles with weights that ramp linearly across each overlap "
        "(hides seams from uneven illumination, softens misaligned detail)."))
    tiff_compression: str = field(default="jpeg", metadata=_help(
        "Compression of the OME-TIFF tiles: 'jpeg' (small, lossy, quality 90; 8-bit data "
        "only, deeper data are deflated), 'deflate' or 'lzw' (lossless, several times "
        "larger)."))
    ngff_version: str = field(default="0.4", metadata=_help(
        "NGFF version of the OME-Zarr: '0.4' (Zarr v2, read by most tools today) or '0.5' "
        "(Zarr v3, sharded)."))
    flat_field: str | None = field(default=None, metadata=_help(
        "Divide out the illumination profile (vignetting) in the mosaic, never in "
        "registration: 'auto' estimates it from the tiles (a smoothed per-pixel median); "
        "a file gives it (an image of an empty field). Off by default."))
    stitch_tiff: bool = field(default=False, metadata=_help(
        "Also write a pyramidal OME-TIFF (the same as --format ome-tiff)."))
    stitch_dzi: bool = field(default=False, metadata=_help(
        "Also write a Deep Zoom (DZI) pyramid and viewer.html (the same as --format dzi)."))
    preview_name: str = field(default="preview.jpg", metadata=_help(
        "File name of the 1000 px preview (the OpenFlexure server's live-preview call, "
        "openflexure-stitch's --stitching_mode only_stage_stitch, names it "
        "stitched_from_stage.jpg)."))
    tile_size: int | None = field(default=None, metadata=_help(
        "Tile size, in pixels, of the pyramidal OME-TIFF/DZI outputs (a power of two "
        "is best). Default: 256."))
    device: str = field(default="cpu", metadata=_help(
        "Where correlation and placement run: 'cpu' (NumPy), 'cuda' (CuPy on an "
        "NVIDIA GPU) or 'auto' (CUDA when usable, else the CPU)."))
    device_memory: str | None = field(default=None, metadata=_help(
        "Memory for each batch of pairs on the device: an amount such as '512MB' or "
        "'2GiB', or a fraction of the free memory such as '0.5'. Default: 64 MB on "
        "the CPU (32 MB with --priority memory), half the free GPU memory with CUDA."))
    batch_pairs: int | None = field(default=None, metadata=_help(
        "Pairs correlated per batch. Default: sized from a memory budget."))
    workers: int | None = field(default=None, metadata=_help(
        "Threads for decoding and filtering tiles, and batches of pairs correlated at once "
        "on the CPU. Default: the number of CPUs."))
    scheduler: str | None = field(default=None, metadata=_help(
        "Address of a Dask scheduler (such as tcp://head:8786; also the environment "
        "variable OFSTITCH_SCHEDULER): the pairs are correlated by its workers, which read "
        "the tiles from a shared file system; placement and outputs stay here. Needs "
        "pip install \"ofstitch[dask]\". Default: correlate on this machine."))

    def __post_init__(self) -> None:
        if self.minimum_overlap is not None:
            _check("minimum_overlap", self.minimum_overlap, low=0.0, high=1.0, high_open=True,
                   allowed="in [0, 1) (a fraction of the tile area)")
        for name, value, allowed, low, high in (
                ("min_peak_quality", self.min_peak_quality, "in [0, 1]", 0.0, 1.0),
                ("max_stage_discrepancy", self.max_stage_discrepancy,
                 "a number of pixels, zero or more", 0.0, None),
                ("csm_calibration_width", self.csm_calibration_width,
                 "a width in pixels, 0 to 100000 (0: leave the matrix unscaled)", 0, 100_000),
                ("image_count", self.image_count, "at least 1", 1, None),
                ("tile_size", self.tile_size, "between 16 and 8192", 16, 8192),
                ("batch_pairs", self.batch_pairs, "at least 1", 1, None),
                ("workers", self.workers, "between 1 and 1024", 1, 1024)):
            if value is not None:
                _check(name, value, low=low, high=high, allowed=allowed,
                       integer=name not in ("min_peak_quality", "max_stage_discrepancy"))
        if self.csm_matrix is not None:
            flat = [v for row in self.csm_matrix for v in row]
            for v in flat:
                _check("csm_matrix", v, allowed="2x2 finite numbers, at most 1e6 in size",
                       low=-1e6, high=1e6)
        object.__setattr__(self, "stitching_mode", canonical_choice(
            self.stitching_mode, STITCHING_MODES, STITCHING_MODE_ALIASES))
        if isinstance(self.formats, str):  # one format, not one per letter
            object.__setattr__(self, "formats", (self.formats,))
        object.__setattr__(self, "formats", tuple(
            canonical_choice(str(f), OUTPUT_FORMATS, OUTPUT_FORMAT_ALIASES)
            for f in self.formats))
        for name, values, allowed in (
                ("stitching_mode", (self.stitching_mode,), STITCHING_MODES),
                ("thresholding", (self.thresholding,), THRESHOLDING_METHODS),
                ("placement", (self.placement,), PLACEMENT_METHODS),
                ("formats", self.formats, OUTPUT_FORMATS),
                ("blend", (self.blend,), BLENDS),
                ("tiff_compression", (self.tiff_compression,), TIFF_COMPRESSIONS),
                ("ngff_version", (self.ngff_version,), NGFF_VERSIONS),
                ("priority", (self.priority,), PRIORITIES),
                ("device", (self.device,), DEVICES)):
            for v in values:
                if v not in allowed:
                    raise SettingError(name, f"must be one of {', '.join(allowed)}, got {v!r}")
        if self.flat_field not in (None, "auto") and not Path(self.flat_field).is_file():
            raise SettingError("flat_field", f"must be 'auto' or an image file, got "
                               f"{self.flat_field!r}")
        if self.device_memory is not None:
            parse_memory(self.device_memory)  # raises a clear error early
        name = self.preview_name
        if Path(name).name != name or not name.lower().endswith((".jpg", ".jpeg")):
            raise SettingError("preview_name",
                               f"must be a file name ending in .jpg, got {name!r}")
        # The placement method, resolved once: the reference's whenever one of its
        # options is asked for.
        if self.thresholding == "manual" or self.min_peak_quality is not None or \
                self.max_stage_discrepancy is not None:
            object.__setattr__(self, "placement", "reference")

    @property
    def output_formats(self) -> tuple[str, ...]:
        """The full-resolution formats to write: ``formats`` plus the --stitch-* aliases."""
        wanted = list(self.formats)
        if self.stitch_tiff:
            wanted.append("ome-tiff")
        if self.stitch_dzi:
            wanted.append("dzi")
        return tuple(f for f in OUTPUT_FORMATS if f in wanted)

    def with_correlation(self, **changes) -> StitchSettings:
        """A copy with some correlation settings changed."""
        return replace(self, correlation=replace(self.correlation, **changes))


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_memory(text: str) -> tuple[str, float]:
    """Parse ``--device-memory``: ``("bytes", n)`` for '512MB', ``("fraction", f)`` for '0.5'."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or (unit == "" and value > 1):
        value = float("nan")  # a bare number is a fraction; 'inf' is no amount
    if unit == "" and 0 < value <= 1:
        return "fraction", value
    if unit in _UNITS and value > 0 and math.isfinite(value * _UNITS[unit]):
        return "bytes", value * _UNITS[unit]
    raise SettingError(
        "device_memory", f"must be an amount such as '512MB' or '2GiB', or a fraction of the "
        f"free memory such as '0.5', got {text!r}")


def help_text(cls: type, name: str) -> str:
    """The CLI help of a settings field."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


@dataclass(frozen=True)
class WatchSettings:
    """Settings of ``ofstitch watch`` (live stitching) beyond those of a stitch run."""

    settle_time: float = field(default=0.5, metadata=_help(
        "Seconds a tile file must be left unchanged before it is read (besides the "
        "check that a JPEG or PNG is complete). Raise it for slow network folders."))
    idle_timeout: float | None = field(default=None, metadata=_help(
        "Stop after this many seconds without a new or changed file. Default: watch "
        "until Ctrl-C."))
    preview_width: int = field(default=1000, metadata=_help(
        "Width in pixels of the live preview.jpg."))
    final: bool = field(default=False, metadata=_help(
        "When watching stops, stitch the whole scan as 'ofstitch FOLDER' would (all "
        "pairs come from the cache) and write the full outputs of --stitching-mode."))
    dzi: bool = field(default=False, metadata=_help(
        "Also rewrite a Deep Zoom pyramid of the live mosaic (preview.dzi) after each "
        "tile, at the resolution of the preview tiles; with --final, the final "
        "outputs include a full-resolution DZI."))
    polling: bool = field(default=False, metadata=_help(
        "Poll the folder for changes instead of using the operating system's file "
        "events (for network folders, where events do not arrive)."))

    def __post_init__(self) -> None:
        _check("settle_time", self.settle_time, low=0.0, high=3600.0,
               allowed="between 0 and 3600 seconds")
        if self.idle_timeout is not None:
            _check("idle_timeout", self.idle_timeout, low=0.0, low_open=True,
                   allowed="a finite, positive number of seconds")
        _check("preview_width", self.preview_width, low=1, high=65_535, integer=True,
               allowed="between 1 and 65535 pixels")
