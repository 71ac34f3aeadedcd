"""Property tests: the parsers of untrusted input never crash and return well-formed values.

Arbitrary bytes, text and JSON go into every function that reads something a user, a
microscope or an earlier run wrote: the EXIF UserComment (:func:`parse_usercomment`,
:func:`metadata_from_usercomment`), file names (:func:`position_from_filename`), Fiji tile
configurations (:func:`read_tile_configuration`), ``--csm-matrix`` (:func:`parse_csm`),
``--device-memory`` (:func:`parse_memory`) and the correlation cache
(:meth:`CorrelationCache.load`, :meth:`CorrelationCache.lookup`). Each may only return
(``None``, an empty result, or a well-formed value: finite floats, 2x2 matrices) or raise
an :class:`OfstitchError`; warnings must be :class:`OfstitchWarning`.

The plain tests at the end of some sections pin inputs the properties found to crash
or to give non-finite values (fixed since: the reason is in each docstring).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ofstitch.cache import CACHE_NAME, FORMAT, VERSION, CorrelationCache, pair_key
from ofstitch.errors import OfstitchError, OfstitchWarning
from ofstitch.metadata import (
    TileMetadata,
    metadata_from_usercomment,
    parse_csm,
    parse_usercomment,
    position_from_filename,
    read_tile_configuration,
)
from ofstitch.settings import CorrelationSettings, parse_memory

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INT64 = st.integers(-2**63, 2**63 - 1)

# ----------------------------------------------------------------------------- strategies


def json_values(leaves: st.SearchStrategy | None = None, max_leaves: int = 10):
    """Arbitrary JSON values (NaN and infinities included, as Python's json writes them)."""
    leaves = leaves if leaves is not None else (
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12))
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=5)
                        | st.dictionaries(st.text(max_size=10), kids, max_size=5),
                        max_leaves=max_leaves)


def json_dicts(leaves: st.SearchStrategy | None = None):
    return st.dictionaries(st.text(max_size=10), json_values(leaves), max_size=4)


# Leaves that reach the interesting branches of the metadata readers.
NUMBERISH = (st.floats(allow_nan=False, allow_infinity=False) | st.integers() | st.floats()
             | st.none() | st.booleans()
             | st.sampled_from(["1.5", "-3", "nan", "inf", "1e400", "", "x", "0x10"]))
MATRICES = (st.lists(st.lists(NUMBERISH, min_size=2, max_size=2), min_size=2, max_size=2)
            | json_values(NUMBERISH, max_leaves=8))
POSITIONS = (st.fixed_dictionaries({"x": NUMBERISH, "y": NUMBERISH}, optional={"z": NUMBERISH})
             | st.lists(NUMBERISH, min_size=0, max_size=4)
             | st.fixed_dictionaries({}, optional={"x": NUMBERISH, "y": NUMBERISH})
             | json_values(NUMBERISH, max_leaves=6))


@st.composite
def openflexure_comments(draw) -> dict:
    """UserComment dicts in the v3, legacy and v2 layouts, with arbitrary leaves."""
    position, matrix = draw(POSITIONS), draw(MATRICES)
    resolution = draw(json_values(NUMBERISH, max_leaves=4)
                      | st.lists(NUMBERISH, min_size=2, max_size=2))
    layout = draw(st.sampled_from(["v3", "legacy", "v2"]))
    if layout == "v3":
        data = {"stage": {"position": position},
                "camera_stage_mapping": {"image_to_stage_displacement_matrix": matrix,
                                         "image_resolution": resolution},
                "pixel_size_um": draw(NUMBERISH)}
    elif layout == "legacy":
        data = {"/stage/": {"position": position},
                "/camera_stage_mapping/": {"image_to_stage_displacement_matrix": matrix,
                                           "image_resolution": resolution}}
    else:
        data = {"instrument": {
            "state": {"stage": {"position": position}},
            "settings": {"extensions": {
                "org.openflexure.camera_stage_mapping": {"image_to_stage_displacement": matrix},
                "usafcal": {"um_per_px": draw(NUMBERISH)}}}}}
    noise = st.dictionaries(st.text(max_size=10), json_values(max_leaves=4), max_size=2)
    data.update(draw(noise))  # noise beside (and sometimes over) the known keys
    return data


def is_finite_number(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def assert_matrix(m) -> None:
    """A 2x2 tuple of finite floats."""
    assert isinstance(m, tuple) and len(m) == 2
    for row in m:
        assert isinstance(row, tuple) and len(row) == 2
        assert all(is_finite_number(v) for v in row), m


# ----------------------------------------------------------------------------- UserComment

PREFIXES = st.sampled_from([b"", b"ASCII\0\0\0", b"UNICODE\0", b"\0" * 8, b"JIS\0\0\0\0\0"])


@FUZZ
@given(raw=st.none() | st.text(max_size=300) | st.binary(max_size=300)
       | st.builds(lambda p, b: p + b, PREFIXES, st.binary(max_size=300))
       | st.builds(lambda p, v, enc: p + json.dumps(v).encode(enc), PREFIXES, json_values(),
                   st.sampled_from(["utf-8", "utf-16-le", "utf-16-be"])))
def test_parse_usercomment_returns_a_dict_or_none(raw):
    data = parse_usercomment(raw)
    assert data is None or isinstance(data, dict)


@FUZZ
@given(data=json_dicts(st.none() | st.booleans() | INT64 | st.floats(allow_nan=False)
                       | st.text(max_size=12)),
       form=st.sampled_from(["str", "utf-8", "ascii", "undefined", "ucs2-le", "ucs2-be"]))
def test_parse_usercomment_round_trips_every_exif_encoding(data, form):
    text = json.dumps(data)
    raw = {"str": text, "utf-8": text.encode(), "ascii": b"ASCII\0\0\0" + text.encode(),
           "undefined": b"\0" * 8 + text.encode(),
           "ucs2-le": b"UNICODE\0" + text.encode("utf-16-le"),
           "ucs2-be": b"UNICODE\0" + text.encode("utf-16-be")}[form]
    assert parse_usercomment(raw) == data


def assert_metadata(meta: TileMetadata) -> None:
    assert isinstance(meta, TileMetadata)
    if meta.stage_xyz is not None:
        assert isinstance(meta.stage_xyz, tuple) and len(meta.stage_xyz) == 3
        assert all(is_finite_number(v) for v in meta.stage_xyz), meta.stage_xyz
        assert meta.position_source == "exif"
    else:
        assert meta.position_source == "none"
    if meta.csm is not None:
        assert_matrix(meta.csm)
        assert meta.csm_width is not None
    assert meta.csm_width is None or (isinstance(meta.csm_width, int) and meta.csm_width >= 1)
    assert meta.um_per_px is None or (is_finite_number(meta.um_per_px) and meta.um_per_px > 0)
    assert meta.from_openflexure == (meta.csm is not None or meta.stage_xyz is not None)


@FUZZ
@given(data=json_dicts() | openflexure_comments())
def test_metadata_from_any_usercomment_is_well_formed(data):
    assert_metadata(metadata_from_usercomment(data))


@FUZZ
@given(x=st.floats(allow_nan=False, allow_infinity=False), y=INT64,
       z=st.none() | st.floats(allow_nan=False, allow_infinity=False),
       m=st.lists(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2), min_size=2,
                  max_size=2),
       width=st.integers(1, 10**6))
def test_metadata_reads_a_good_v3_comment(x, y, z, m, width):
    position = {"x": x, "y": y} | ({"z": z} if z is not None else {})
    meta = metadata_from_usercomment({
        "stage": {"position": position},
        "camera_stage_mapping": {"image_to_stage_displacement_matrix": m,
                                 "image_resolution": [width // 2 + 1, width]}})
    assert meta.stage_xyz == (x, float(y), z or 0.0)
    assert meta.csm == (tuple(m[0]), tuple(m[1]))
    assert meta.csm_width == width


def test_metadata_calibration_width_is_at_least_one_pixel():
    """A width in (0, 0.5) used to round to 0, which load_scan reads as 'leave unscaled'."""
    meta = metadata_from_usercomment({"camera_stage_mapping": {
        "image_to_stage_displacement_matrix": [[0, 1], [1, 0]], "image_resolution": [1, 0.4]}})
    assert meta.csm_width is None or meta.csm_width >= 1


# ----------------------------------------------------------------------------- file names

DIGITS = "0123456789"
NUMBER_TEXT = st.builds(lambda sign, whole, frac: sign + whole + (f".{frac}" if frac else ""),
                        st.sampled_from(["", "-"]), st.text(DIGITS, min_size=1, max_size=120),
                        st.text(DIGITS, max_size=30))


@FUZZ
@given(name=st.text(max_size=120)
       | st.lists(st.text(DIGITS + "._-", max_size=400), max_size=4).map("_".join))
def test_position_from_any_filename_is_finite_or_none(name):
    pos = position_from_filename(name)
    assert pos is None or (len(pos) == 3 and all(is_finite_number(v) for v in pos)), pos


@FUZZ
@given(prefix=st.text(max_size=20).map(lambda s: s.replace("/", "") + "a"), x=NUMBER_TEXT,
       y=NUMBER_TEXT, z=st.none() | NUMBER_TEXT,
       ext=st.sampled_from([".jpg", ".PNG", ".tiff", ".jpeg"]))
def test_position_from_a_tile_filename(prefix, x, y, z, ext):
    # The prefix ends in a letter: 'x_1_2_3.jpg' is legitimately read as X=1, Y=2, Z=3.
    name = f"{prefix}_{x}_{y}" + (f"_{z}" if z is not None else "") + ext
    pos = position_from_filename(name)
    assert pos == (float(x), float(y), float(z) if z is not None else 0.0)
    assert all(math.isfinite(v) for v in pos)


def test_position_from_a_filename_with_a_huge_coordinate_is_finite_or_none():
    """309+ digits used to parse to inf (only reachable through the library: a file name
    that long cannot exist on common file systems)."""
    pos = position_from_filename("tile_" + "9" * 400 + "_0.png")
    assert pos is None or all(math.isfinite(v) for v in pos)


# ----------------------------------------------------------------------------- TileConfiguration

CONFIG_NAMES = st.text("abcxyzABC019_.-", min_size=1, max_size=20)
COORDS = (st.floats(width=64) | st.integers(-10**12, 10**12)).map(str)


@st.composite
def tile_configurations(draw) -> tuple[str, dict]:
    """Fiji TileConfiguration text and the positions it defines (finite ones; last wins)."""
    lines = ["# Define the number of dimensions we are working on", "dim = 2", ""]
    expected: dict[str, tuple[float, float]] = {}
    for _ in range(draw(st.integers(0, 8))):
        name, x, y = draw(CONFIG_NAMES), draw(COORDS), draw(COORDS)
        z = draw(st.none() | COORDS)
        coords = f"{x}, {y}" + (f", {z}" if z is not None else "")
        lines.append(f"{name}; ; ({coords})")
        if math.isfinite(float(x)) and math.isfinite(float(y)):
            expected[name] = (float(x), float(y))
        if draw(st.booleans()):
            lines.append(draw(st.text(st.characters(codec="utf-8", exclude_characters="\r\n"),
                                      max_size=40)))
    return "\n".join(lines), expected


def _read_configuration(content: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "TileConfiguration.txt"
        path.write_bytes(content)
        return read_tile_configuration(path)


def assert_configuration(config: dict) -> None:
    assert isinstance(config, dict)
    for name, xy in config.items():
        assert isinstance(name, str) and name
        assert isinstance(xy, tuple) and len(xy) == 2
        assert all(is_finite_number(v) for v in xy), xy


@FUZZ
@given(content=st.binary(max_size=600)
       | st.text(max_size=600).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_read_any_tile_configuration(content):
    assert_configuration(_read_configuration(content))


@FUZZ
@given(config=tile_configurations())
def test_read_tile_configuration_finds_every_finite_position(config):
    text, expected = config
    found = _read_configuration(text.encode())
    assert_configuration(found)
    assert {k: found[k] for k in expected if k in found} == expected
    assert set(expected) <= set(found)


def test_read_tile_configuration_of_a_missing_file_is_empty(tmp_path):
    assert read_tile_configuration(tmp_path / "missing.txt") == {}
    assert read_tile_configuration(tmp_path) == {}  # a folder


# ----------------------------------------------------------------------------- --csm-matrix


def _parse_csm_or_error(text: str):
    try:
        m = parse_csm(text)
    except OfstitchError as exc:
        assert "--csm-matrix" in str(exc)
        return None
    assert_matrix(m)
    return m


@FUZZ
@given(text=st.text(max_size=200) | json_values().map(json.dumps) | MATRICES.map(json.dumps))
def test_parse_any_csm_text(text):
    _parse_csm_or_error(text)


@FUZZ
@given(m=st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False) | INT64,
                           min_size=2, max_size=2), min_size=2, max_size=2),
       parentheses=st.booleans())
def test_parse_csm_round_trips(m, parentheses):
    text = json.dumps(m)
    if parentheses:
        text = text.replace("[", "(").replace("]", ")")
    expected = tuple(tuple(float(v) for v in row) for row in m)
    assert _parse_csm_or_error(text) == expected


def test_parse_csm_of_deeply_nested_text_is_a_user_error():
    """json.loads raises RecursionError here, which used to escape as a traceback."""
    with pytest.raises(OfstitchError):
        parse_csm("[" * 5000)


# ----------------------------------------------------------------------------- --device-memory

UNITS = ["", "b", "k", "kb", "kib", "m", "mb", "mib", "g", "gb", "gib", "t", "tb", "tib",
         "x", "bytes", "gbit", "%"]
MULTIPLIERS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6,
               "mb": 10**6, "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30,
               "t": 10**12, "tb": 10**12, "tib": 2**40}


def _parse_memory_or_error(text: str):
    try:
        kind, value = parse_memory(text)
    except OfstitchError as exc:
        assert "device_memory" in str(exc)
        return None
    assert kind in ("fraction", "bytes")
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (kind, value)
    if kind == "fraction":
        assert value <= 1
    return kind, value


@FUZZ
@given(text=st.text(max_size=40))
def test_parse_any_memory_text(text):
    _parse_memory_or_error(text)


@FUZZ
@given(number=st.floats(0, 1e250) | st.integers(0, 10**15), space=st.sampled_from(["", " "]),
       unit=st.sampled_from(UNITS), upper=st.booleans())
def test_parse_memory_amounts_and_fractions(number, space, unit, upper):
    text = f"{number}{space}{unit.upper() if upper else unit}"
    result = _parse_memory_or_error(text)
    value = float(number)
    if unit == "" and 0 < value <= 1:
        assert result == ("fraction", value)
    elif unit in MULTIPLIERS and unit != "" and value > 0:
        assert result == ("bytes", pytest.approx(value * MULTIPLIERS[unit]))
    else:
        assert result is None


def test_parse_memory_of_an_overflowing_amount_is_a_user_error():
    """1e308 * 10**12 used to give ('bytes', inf), and memory_budget's int(inf) a traceback."""
    assert _parse_memory_or_error("1e308TB") is None


# ----------------------------------------------------------------------------- correlation cache


def _load(cache_bytes: bytes | None, journal_bytes: bytes | None = None) -> CorrelationCache:
    """Write the cache (and its journal) into a fresh folder and load it; warnings must be
    OfstitchWarnings."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CACHE_NAME
        if cache_bytes is not None:
            path.write_bytes(cache_bytes)
        if journal_bytes is not None:
            path.with_name(CACHE_NAME + ".journal").write_bytes(journal_bytes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = CorrelationCache.load(path)
    others = [w for w in caught if not issubclass(w.category, OfstitchWarning)]
    assert not others, [str(w.message) for w in others]
    assert isinstance(cache.sets, dict)
    for key, entries in cache.sets.items():
        assert isinstance(key, str) and isinstance(entries, dict)
    return cache


def _envelope(sets) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "sets": sets}).encode()


JSON_TEXT = json_values().map(lambda v: json.dumps(v).encode())


@FUZZ
@given(cache=st.none() | st.binary(max_size=400) | JSON_TEXT | json_values().map(_envelope),
       journal=st.none() | st.binary(max_size=200)
       | st.lists(JSON_TEXT, max_size=4).map(b"\n".join))
def test_load_any_cache_file(cache, journal):
    loaded = _load(cache, journal)
    for file_keys in (None, ["a.jpg|1|2"]):
        for settings_, covered in loaded.settings_summary(file_keys):
            assert isinstance(settings_, CorrelationSettings)
            assert isinstance(covered, int) and covered >= 0


# The scan the lookups are made for: three tiles, three pairs.
FILE_KEYS = ["a.jpg|100|1", "b.jpg|100|2", "c.jpg|100|3"]
PAIRS = np.array([[0, 1], [1, 2], [0, 2]])
EXPECTED = np.array([[0.0, 112.0], [84.0, 0.0], [84.0, 112.0]])
MASKED = CorrelationSettings(corr_mask_radius=20.0)
PAIR_KEYS = [pair_key(FILE_KEYS[a], FILE_KEYS[b]) for a, b in PAIRS.tolist()] + \
            [pair_key(FILE_KEYS[b], FILE_KEYS[a]) for a, b in PAIRS.tolist()]
ENTRY_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
                | st.sampled_from([0.0, 112.0, -112.0, 84.0, -84.0, 0.5, 10**30, 10**400]))
GOOD_ENTRIES = st.builds(  # [dy, dx, quality, ey, ex, candidates], or [null, null, ...]
    lambda shift, q, e, c: [*shift, q, *e, *c],
    st.tuples(st.floats(-200, 200), st.floats(-200, 200)) | st.just((None, None)),
    st.floats(0, 1), st.sampled_from([(0.0, 112.0), (-84.0, -112.0), (84.0, 0.5), (3.0, 4.0)]),
    st.just(()) | st.tuples(st.lists(st.lists(st.floats(-200, 200), min_size=3, max_size=3),
                                     max_size=3)))
ENTRIES = (GOOD_ENTRIES | st.lists(ENTRY_LEAVES, min_size=5, max_size=5)
           | st.lists(ENTRY_LEAVES, max_size=7) | json_values(ENTRY_LEAVES, max_leaves=8))
SET_KEYS = st.sampled_from([CorrelationSettings().key(), MASKED.key()]) | st.text(max_size=8)


def _number(v) -> bool:
    """A JSON number that is a finite float (an int too large for a float is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _reference_lookup(entries: dict, settings_: CorrelationSettings, k: int):
    """What lookup should return for pair ``k``: ``None`` (not found) or (shift, quality).

    Entries without candidate peaks (older versions wrote them) count as not found."""
    a, b = PAIRS[k]
    sign, entry = 1.0, entries.get(pair_key(FILE_KEYS[a], FILE_KEYS[b]))
    if entry is None:
        sign, entry = -1.0, entries.get(pair_key(FILE_KEYS[b], FILE_KEYS[a]))
    if not (isinstance(entry, list) and len(entry) == 6 and all(_number(v) for v in entry[2:5])
            and isinstance(entry[5], list) and all(
                isinstance(c, list) and len(c) == 3 and all(_number(v) for v in c)
                for c in entry[5])):
        return None
    no_peak = entry[0] is None and entry[1] is None
    if not (no_peak or (_number(entry[0]) and _number(entry[1]))):
        return None
    # A masked search and strips (the default) depend on the stage's prediction.
    depends = settings_.corr_mask_radius is not None or (settings_.pad
                                                         and settings_.search_margin > 0)
    if depends and not np.allclose(
            sign * np.asarray(entry[3:5], float), EXPECTED[k], atol=1.0):
        return None
    shift = (np.nan, np.nan) if no_peak else (sign * entry[0], sign * entry[1])
    return shift, entry[2]


CACHE_SETS = (
    st.builds(lambda key, entries, more: {key: entries, **more},
              st.sampled_from([CorrelationSettings().key(), MASKED.key()]),
              st.fixed_dictionaries({}, optional={k: ENTRIES for k in PAIR_KEYS}),
              st.dictionaries(st.text(max_size=8), st.dictionaries(st.text(max_size=8),
                                                                   ENTRIES, max_size=2),
                              max_size=2))
    | st.dictionaries(SET_KEYS, st.dictionaries(st.sampled_from(PAIR_KEYS) | st.text(max_size=8),
                                                ENTRIES, max_size=6), max_size=3))


@FUZZ
@given(sets=CACHE_SETS, masked=st.booleans())
def test_lookup_in_any_cache(sets, masked):
    settings_ = MASKED if masked else CorrelationSettings()
    cache = _load(_envelope(sets))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found, shift, quality, _ = cache.lookup(settings_, FILE_KEYS, PAIRS, EXPECTED)
    assert all(issubclass(w.category, OfstitchWarning) for w in caught)
    assert found.dtype == bool and found.shape == (len(PAIRS),)
    assert shift.shape == (len(PAIRS), 2) and quality.shape == (len(PAIRS),)
    entries = json.loads(_envelope(sets))["sets"].get(settings_.key(), {})
    for k in range(len(PAIRS)):
        reference = _reference_lookup(entries, settings_, k)
        assert found[k] == (reference is not None), (k, entries)
        if not found[k]:
            assert np.isnan(shift[k]).all() and np.isnan(quality[k])
            continue
        assert math.isfinite(quality[k]) and quality[k] == reference[1]
        assert np.isfinite(shift[k]).all() or np.isnan(shift[k]).all()
        np.testing.assert_array_equal(shift[k], reference[0])


def test_lookup_with_a_huge_integer_ignores_the_entry():
    """np.isfinite(10**30) used to raise TypeError out of lookup; 10**400 is no float."""
    entry = [10**400, 0, 0.5, 0, 112, []]
    cache = _load(_envelope({CorrelationSettings().key(): {PAIR_KEYS[0]: entry}}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OfstitchWarning)
        found = cache.lookup(CorrelationSettings(), FILE_KEYS, PAIRS, EXPECTED).found
    assert not found[0]
