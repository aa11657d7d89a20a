"""A reader for R's lazy-load data databases (``data/Rdata.rdx`` + ``data/Rdata.rdb``), enough
to get character vectors out of an R data package without R.

R stores each dataset of a package as one serialized object (XDR format, "X\\n" header) in the
``.rdb`` file, each prefixed by its 4-byte big-endian uncompressed length and zlib-compressed;
the ``.rdx`` index is a gzip-compressed serialized list whose ``variables`` element maps each
dataset name to its (offset, length) in the ``.rdb``. Only the SEXP types data packages of text
use are decoded (symbols, pairlists for attributes, character / logical / integer / double
vectors, lists); anything else raises ``DataError`` rather than guessing.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import DataError

# SEXP type codes (R Internals, "Serialization formats")
SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 1, 2, 9, 10, 13, 14, 16, 19
NIL, EMPTY_ENV, BASE_ENV, GLOBAL_ENV, UNBOUND, MISSING_ARG, BASE_NS = 254, 242, 241, 253, 252, \
    251, 247
REF = 255
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_SINGLETONS = {NIL, EMPTY_ENV, BASE_ENV, GLOBAL_ENV, UNBOUND, MISSING_ARG, BASE_NS}


@dataclass
class RVector:
    """A decoded R vector with its attributes (e.g. ``names``)."""

    values: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)


class _Unserializer:
    """Reads one XDR-serialized R object from ``buf``."""

    def __init__(self, buf: bytes) -> None:
        if buf[:2] != b"X\n":
            raise DataError("R data: not an XDR serialization (expected the 'X\\n' header)")
        self.buf, self.pos, self.refs = buf, 2, []
        version = self.int()
        self.int(), self.int()  # the writer's R version, the minimal reader version
        if version == 3:
            n = self.int()  # the native encoding's name
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def numbers(self, fmt: str, size: int) -> list[Any]:
        n = self.int()
        out = list(struct.unpack_from(f">{n}{fmt}", self.buf, self.pos))
        self.pos += size * n
        return out

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind in _SINGLETONS:
            return None
        if kind == REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return text
        if kind == LIST:
            return self.pairlist(flags)
        return self.vector(kind, flags)

    def pairlist(self, flags: int) -> dict[str, Any]:
        """A pairlist (how attributes are stored) as a dict from tag to value."""
        if flags & _HAS_ATTR:
            self.item()
        tag = self.item() if flags & _HAS_TAG else None
        out = {tag: self.item()}
        rest = self.item()
        if isinstance(rest, dict):
            out.update(rest)
        return out

    def vector(self, kind: int, flags: int) -> RVector:
        if kind in (STR, VEC):
            values = [self.item() for _ in range(self.int())]
        elif kind in (LGL, INT):
            values = self.numbers("i", 4)
        elif kind == REAL:
            values = self.numbers("d", 8)
        else:
            raise DataError(f"R data: unsupported SEXP type {kind}")
        attrs = self.item() if flags & _HAS_ATTR else {}
        return RVector(values, attrs or {})


def unserialize(buf: bytes) -> Any:
    """One R object from its XDR serialization."""
    return _Unserializer(buf).item()


def read_lazyload(data_dir: Path) -> dict[str, Any]:
    """Every dataset of an R package's ``data/`` directory, by name.

    Raises:
        DataError: a file is missing or holds something this reader does not decode.
    """
    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    if not rdx.is_file() or not rdb.is_file():
        raise DataError(f"R data: {data_dir} has no Rdata.rdx / Rdata.rdb")
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    variables = index.values[index.attrs["names"].values.index("variables")]
    blob = rdb.read_bytes()
    out = {}
    for name, where in zip(variables.attrs["names"].values, variables.values, strict=True):
        offset, length = where.values
        out[name] = unserialize(zlib.decompress(blob[offset + 4:offset + length]))
    return out
