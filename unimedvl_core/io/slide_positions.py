"""Tile positions of a sparse slide level scanned from the undecoded bytes of its Per-Frame Functional Groups.

A 40x level has ~100,000 frames, whose items pydicom takes seconds to decode; their Row and Column Positions
are read here from the bytes instead, but only in the common layout where that is provably what pydicom's
decoding gives, and ``None`` (decode them) for anything else (docs/medical-io.md "Whole-slide images"). The
caller decides whether the scan applies at all (one focal plane) and selects frames; this module only reads
positions. Scanned positions are kept per process, keyed by a hash of the bytes scanned.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict

import numpy as np

__all__ = ["scanned_positions", "clear_scanned_positions"]

# Little-endian tags: (0048,021A) Plane Position (Slide) Sequence, (0048,021F) Row / (0048,021E) Column Position
# In Total Image Pixel Matrix (SL), (0048,0106) Optical Path Identifier, (0048,0207) Optical Path Identification
# Sequence; an (0048,0106) or (0048,0207) anywhere means a per-frame optical path: the scan refuses
_PLANE_POSITION, _ROW, _COLUMN = 0x0048021A, 0x0048021F, 0x0048021E
_PATH_TAGS = (b"\x48\x00\x06\x01", b"\x48\x00\x07\x02")
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_VRS = _LONG_VRS | frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))


class _Unsure(Exception):
    """The bytes are not in the one layout the scan reads."""


def _tag_bytes(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


# ----------------------------------------------------------------------------------------------------------
# Kept per process: the server reads uploads in a thread pool, hence the lock (docs/medical-io.md "Whole-slide
# images")

_KEPT = 16  # levels; a 40x level's two position arrays are ~2 MB
_kept: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_lock = threading.Lock()


def clear_scanned_positions() -> None:
    with _lock:
        _kept.clear()


def scanned_positions(data: bytes, implicit: bool, frames: int) -> tuple[np.ndarray, np.ndarray] | None:
    """1-based Row and Column Position of each of ``frames`` items of a Per-Frame Functional Groups Sequence's
    little-endian value ``data`` (``implicit`` VR or explicit), or None unless: there are ``frames`` items; each
    has exactly one Plane Position (Slide) Sequence as its own element, whose first item has exactly one Row and
    one Column Position (SL) as its own elements; those three tags occur nowhere else in the bytes (a 4-byte
    search, so another VR, a nested copy or stray bytes refuse); and no Optical Path Identifier nor Optical Path
    Identification Sequence tag occurs at all."""
    key = hashlib.blake2b(data, digest_size=32, person=b"implicit" if implicit else b"explicit").digest()
    with _lock:
        if key in _kept:
            _kept.move_to_end(key)
            return _kept[key] if len(_kept[key][0]) == frames else None
    try:
        found = _scan(data, implicit, frames)
    except (_Unsure, struct.error, IndexError, RecursionError):
        return None
    for values in found:
        values.setflags(write=False)
    with _lock:
        _kept[key] = found
        while len(_kept) > _KEPT:
            _kept.popitem(last=False)
    return found


def _scan(data: bytes, implicit: bool, frames: int) -> tuple[np.ndarray, np.ndarray]:
    if any(tag in data for tag in _PATH_TAGS):
        raise _Unsure
    if any(data.count(_tag_bytes(tag)) != frames for tag in (_PLANE_POSITION, _ROW, _COLUMN)):
        raise _Unsure
    starts, ends = _item_spans(data, implicit)
    if len(starts) != frames:
        raise _Unsure
    buffer = np.frombuffer(data + bytes(16), np.uint8)  # a header cut short reads zeros, then fails the end check
    plane = _own_elements(data, buffer, starts, ends, implicit, (_PLANE_POSITION,))[_PLANE_POSITION]
    if not implicit and np.any(plane.vr != _vr_code(b"SQ")):
        raise _Unsure
    first_starts, first_ends = _first_items(data, buffer, plane, implicit)
    own = _own_elements(data, buffer, first_starts, first_ends, implicit, (_ROW, _COLUMN))
    return tuple(_signed_longs(buffer, own[tag], implicit) for tag in (_ROW, _COLUMN))


# ----------------------------------------------------------------------------------------------------------
# Walking items


class _Found:
    """Where one tag was found as an element of its own in each item: value offset, length, VR (explicit)."""

    def __init__(self, count: int) -> None:
        self.times = np.zeros(count, np.int64)
        self.value = np.zeros(count, np.int64)
        self.length = np.zeros(count, np.int64)
        self.vr = np.zeros(count, np.int64)


def _vr_code(vr: bytes) -> int:
    return vr[0] | vr[1] << 8


_LONG_CODES = np.asarray(sorted(_vr_code(vr) for vr in _LONG_VRS), np.int64)
_VR_CODES = np.asarray(sorted(_vr_code(vr) for vr in _VRS), np.int64)


def _u16(buffer: np.ndarray, at: np.ndarray) -> np.ndarray:
    return buffer[at].astype(np.int64) | buffer[at + 1].astype(np.int64) << 8


def _u32(buffer: np.ndarray, at: np.ndarray) -> np.ndarray:
    return _u16(buffer, at) | _u16(buffer, at + 2) << 16


def _own_elements(data: bytes, buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray, implicit: bool,
                  tags: tuple[int, ...]) -> dict[int, _Found]:
    """The elements ``tags`` among each item's own elements (not nested ones), each exactly once per item, all
    items walked element by element at once; _Unsure unless every item's elements end exactly at its end."""
    found = {tag: _Found(len(starts)) for tag in tags}
    at = starts.copy()
    while True:
        walking = np.nonzero(at < ends)[0]
        if not len(walking):
            break
        here = at[walking]
        tag = _u16(buffer, here) << 16 | _u16(buffer, here + 2)
        if np.any(tag >> 16 == 0xFFFE):
            raise _Unsure  # an item or delimiter where an element should be
        if implicit:
            vr, length, header = np.zeros(len(here), np.int64), _u32(buffer, here + 4), np.full(len(here), 8)
        else:
            vr = _u16(buffer, here + 4)
            if not np.all(np.isin(vr, _VR_CODES)):
                raise _Unsure
            long = np.isin(vr, _LONG_CODES)
            length = np.where(long, _u32(buffer, np.where(long, here + 8, here)), _u16(buffer, here + 6))
            header = np.where(long, 12, 8)
        value = here + header
        after = value + length
        for k in np.nonzero(length == _UNDEFINED)[0]:
            if not (implicit or vr[k] == _vr_code(b"SQ")):
                raise _Unsure
            after[k] = _sequence_end(data, int(value[k]), implicit)
        for wanted, where in found.items():
            hit = tag == wanted
            items = walking[hit]
            where.times[items] += 1
            where.value[items], where.length[items], where.vr[items] = value[hit], length[hit], vr[hit]
        at[walking] = after
    if np.any(at != ends) or any(np.any(where.times != 1) for where in found.values()):
        raise _Unsure
    return found


def _first_items(data: bytes, buffer: np.ndarray, sequences: _Found, implicit: bool) -> tuple[np.ndarray, ...]:
    """Start and end of the contents of the first item of each sequence found."""
    starts = sequences.value + 8
    if np.any(_u16(buffer, sequences.value) << 16
                                                   | _u16(buffer, sequences.value + 2) != _ITEM):
        raise _Unsure
    lengths = _u32(buffer, sequences.value + 4)
    ends = starts + lengths
    for k in np.nonzero(lengths == _UNDEFINED)[0]:
        ends[k] = _item_end(data, int(starts[k]), implicit)
    defined = sequences.length != _UNDEFINED
    if np.any(ends[defined] + (lengths[defined] == _UNDEFINED) * 8 > sequences.value[defined]
              + sequences.length[defined]):
        raise _Unsure
    return starts, ends


def _signed_longs(buffer: np.ndarray, found: _Found, implicit: bool) -> np.ndarray:
    """The SL value of each element found, as pydicom reads it; _Unsure unless each is one 4-byte value."""
    if np.any(found.length != 4) or (not implicit and np.any(found.vr != _vr_code(b"SL"))):
        raise _Unsure
    values = buffer[found.value[:, None] + np.arange(4)]
    return np.ascontiguousarray(values).view("<i4").ravel().astype(np.int64)


def _item_spans(data: bytes, implicit: bool) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of the contents of each item of a sequence's bytes."""
    starts, ends, pos = [], [], 0
    item, sequence_end = _swapped(_ITEM), _swapped(_SEQUENCE_END)  # one unpack per item: ~100,000 of them
    while pos < len(data):
        tag, length = struct.unpack_from("<LL", data, pos)
        if tag == sequence_end:
            break
        if tag != item:
            raise _Unsure
        start = pos + 8
        end = _item_end(data, start, implicit) if length == _UNDEFINED else start + length
        starts.append(start)
        ends.append(end)
        pos = end + 8 if length == _UNDEFINED else end
    if pos > len(data):
        raise _Unsure
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


def _swapped(tag: int) -> int:
    """``tag`` as its little-endian bytes read as one 32-bit number (element in the high half)."""
    return (tag & 0xFFFF) << 16 | tag >> 16


def _tag_at(data: bytes, pos: int) -> int:
    group, element = struct.unpack_from("<HH", data, pos)
    return group << 16 | element


def _item_end(data: bytes, pos: int, implicit: bool) -> int:
    """Offset of the delimiter closing an undefined-length item whose elements start at ``pos``."""
    while (tag := _tag_at(data, pos)) != _ITEM_END:
        if tag >> 16 == 0xFFFE:
            raise _Unsure
        vr = None if implicit else data[pos + 4:pos + 6]
        if vr is not None and vr not in _VRS:
            raise _Unsure
        if vr is None or vr in _LONG_VRS:
            (length,), pos = struct.unpack_from("<L", data, pos + (4 if implicit else 8)), pos + (8 if implicit else 12)
        else:
            (length,), pos = struct.unpack_from("<H", data, pos + 6), pos + 8
        if length != _UNDEFINED:
            pos += length
        elif vr in (None, b"SQ"):
            pos = _sequence_end(data, pos, implicit)
        else:
            raise _Unsure
    return pos


def _sequence_end(data: bytes, pos: int, implicit: bool) -> int:
    """Offset after the delimiter of an undefined-length sequence whose items start at ``pos``."""
    while True:
        tag, length = _tag_at(data, pos), struct.unpack_from("<L", data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsure
        pos = pos + length if length != _UNDEFINED else _item_end(data, pos, implicit) + 8
