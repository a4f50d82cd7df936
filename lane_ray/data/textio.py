"""Reading raw text files (delimited and JSON lines) with errors that name file, row and field.

Delimited files are parsed by pyarrow's CSV reader (all columns as strings, converted afterwards), so
large files such as ml-25m load quickly; the slow, precise error paths (finding the offending row of a
bad id or of undecodable bytes) only run when something is wrong.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lane_ray.errors import DataError

_INT_RE = r"^\s*[-+]?\d+(\.0*)?\s*$"
_NUM_RE = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open ``path`` for reading bytes, decompressing ``.gz`` transparently."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def check_nonempty(path: Path) -> None:
    """Raise a :class:`DataError` for a missing or empty file."""
    if not path.exists():
        raise DataError("file not found", file=path)
    if path.is_dir():
        raise DataError("expected a file, found a directory", file=path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", file=path)


def _physical_line(data: bytes, data_index: int, header_lines: int) -> int:
    """1-based line number of the ``data_index``-th non-blank data row (pyarrow skips blank lines)."""
    seen = -1
    for lineno, line in enumerate(data.splitlines(), start=1):
        if lineno <= header_lines:
            continue
        if line.strip(b"\r\n") == b"":
            continue
        seen += 1
        if seen == data_index:
            return lineno
    return header_lines + data_index + 1


def _line_with_text(data: bytes, text: str, encoding: str) -> int | None:
    """1-based number of the first line whose text is ``text`` (pyarrow does not always give row numbers)."""
    target = text.rstrip("\r\n").encode(encoding, errors="replace")
    for lineno, line in enumerate(data.splitlines(), start=1):
        if line.rstrip(b"\r") == target:
            return lineno
    return None


def _first_bad_utf8(data: bytes, delimiter: str, names: list[str], header_lines: int) -> tuple[int, str, bytes]:
    for lineno, line in enumerate(data.splitlines(), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            field = "?"
            if lineno > header_lines and names:
                col = line[: exc.start].count(delimiter.encode())
                field = names[col] if col < len(names) else f"column {col + 1}"
            return lineno, field, line[max(exc.start - 10, 0) : exc.end + 10]
    return 0, "?", b""


class DelimitedTable:
    """A delimited text file read as all-string columns, remembering how to map rows back to lines."""

    def __init__(
        self,
        path: Path,
        *,
        delimiter: str,
        column_names: list[str] | None = None,
        encoding: str = "utf-8",
        quoting: bool = True,
        multichar_delimiter: str | None = None,
    ) -> None:
        self.path = path
        check_nonempty(path)
        with open_binary(path) as fh:
            data = fh.read()
        if not data.strip():
            raise DataError("file is empty", file=path)
        if multichar_delimiter is not None:
            data = data.replace(multichar_delimiter.encode(), delimiter.encode())
        self._data = data
        self.header_lines = 0 if column_names is not None else 1
        if column_names is None:
            header = data.split(b"\n", 1)[0].rstrip(b"\r")
            try:
                column_names = [c.strip().strip('"') for c in header.decode(encoding).split(delimiter)]
            except UnicodeDecodeError:
                raise DataError("header is not valid text", file=path, row=1) from None
        self.names = column_names
        bad_rows: list[Any] = []

        def on_invalid(row: Any) -> str:
            bad_rows.append(row)
            return "error"

        try:
            self.table = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(
                    column_names=column_names,
                    skip_rows=self.header_lines,
                    encoding=encoding,
                    block_size=1 << 24,
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=delimiter,
                    quote_char='"' if quoting else False,
                    invalid_row_handler=on_invalid,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in column_names}, strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid as exc:
            if bad_rows:
                row = bad_rows[0]
                line = row.number if row.number is not None else _line_with_text(data, row.text, encoding)
                raise DataError(
                    f"expected {row.expected_columns} fields ({', '.join(column_names)}), "
                    f"got {row.actual_columns}: {row.text[:80]!r}",
                    file=path,
                    row=line,
                ) from None
            if "utf8" in str(exc).lower() or "utf-8" in str(exc).lower():
                line, field, snippet = _first_bad_utf8(data, delimiter, column_names, self.header_lines)
                raise DataError(
                    f"undecodable bytes (not {encoding}): {snippet!r}", file=path, row=line or None, field=field
                ) from None
            raise DataError(f"cannot parse as delimited text: {exc}", file=path) from None
        if self.table.num_rows == 0:
            raise DataError("file has no data rows", file=path)

    def require(self, *columns: str) -> None:
        """Raise for the first column of ``columns`` that the file lacks."""
        for c in columns:
            if c not in self.table.column_names:
                raise DataError(f"missing column (found: {', '.join(self.table.column_names)})", file=self.path,
                                field=c)

    def line_of(self, index: int) -> int:
        return _physical_line(self._data, index, self.header_lines)

    def column(self, name: str) -> pa.ChunkedArray:
        self.require(name)
        return self.table[name]

    def ints(self, name: str) -> pa.Array:
        return to_int64(self.column(name), file=self.path, field=name, line_of=self.line_of)

    def floats(self, name: str) -> pa.Array:
        return to_float64(self.column(name), file=self.path, field=name, line_of=self.line_of)

    def strings(self, name: str) -> pa.Array:
        return self.column(name).combine_chunks()


def _first_false(mask: pa.ChunkedArray | pa.Array) -> int:
    arr = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    bad = np.flatnonzero(~arr)
    return int(bad[0]) if bad.size else -1


def _value_at(values: pa.ChunkedArray | pa.Array, i: int) -> Any:
    return values[i].as_py() if isinstance(values, pa.Array) else values.combine_chunks()[i].as_py()


def to_int64(values: pa.ChunkedArray | pa.Array, *, file: Path | str, field: str, line_of=None) -> pa.Array:
    """Convert ids or timestamps to int64; the first non-integer value raises naming its row."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_integer(t):
        if values.null_count:
            i = _first_false(pc.is_valid(values))
            raise DataError("missing value", file=file, field=field, row=line_of(i) if line_of else i + 1)
        return values.cast(pa.int64())
    if pa.types.is_floating(t):
        ok = pc.and_(pc.is_valid(values), pc.equal(pc.floor(values), values))
        i = _first_false(ok)
        if i >= 0:
            raise DataError(f"not an integer: {_value_at(values, i)!r}", file=file, field=field,
                            row=line_of(i) if line_of else i + 1)
        return values.cast(pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = pc.match_substring_regex(values, _INT_RE)
        i = _first_false(ok)
        if i >= 0:
            raise DataError(f"not an integer: {_value_at(values, i)!r}", file=file, field=field,
                            row=line_of(i) if line_of else i + 1)
        cleaned = pc.replace_substring_regex(pc.utf8_trim_whitespace(values), r"\.0*$", "")
        try:
            return pc.cast(cleaned, pa.int64())
        except pa.ArrowInvalid:
            raise DataError("integer out of the int64 range", file=file, field=field) from None
    raise DataError(f"expected integers, found column of type {t}", file=file, field=field)


def to_float64(values: pa.ChunkedArray | pa.Array, *, file: Path | str, field: str, line_of=None) -> pa.Array:
    """Convert a numeric column to float64; the first non-number raises naming its row."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return values.cast(pa.float64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = pc.match_substring_regex(values, _NUM_RE)
        i = _first_false(ok)
        if i >= 0:
            raise DataError(f"not a number: {_value_at(values, i)!r}", file=file, field=field,
                            row=line_of(i) if line_of else i + 1)
        return pc.cast(pc.utf8_trim_whitespace(values), pa.float64())
    raise DataError(f"expected numbers, found column of type {t}", file=file, field=field)


def to_timestamp(values: pa.ChunkedArray | pa.Array, *, file: Path | str, field: str, line_of=None) -> pa.Array:
    """Unix seconds (int64) from numbers, numeric strings, ISO-8601 strings or Arrow timestamps/dates."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_timestamp(t):
        return pc.cast(values.cast(pa.timestamp("s", tz=t.tz), safe=False), pa.int64())
    if pa.types.is_date(t):
        return pc.cast(values.cast(pa.date32()).cast(pa.timestamp("s")), pa.int64())
    if pa.types.is_floating(t):
        return pc.cast(pc.floor(values), pa.int64())
    if pa.types.is_integer(t):
        return to_int64(values, file=file, field=field, line_of=line_of)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        numeric = pc.match_substring_regex(values, _NUM_RE)
        if _first_false(numeric) < 0:
            return pc.cast(pc.floor(pc.cast(pc.utf8_trim_whitespace(values), pa.float64())), pa.int64())
        try:
            parsed = pc.cast(values, pa.timestamp("s"))
            return pc.cast(parsed, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        for i, v in enumerate(values.to_pylist()):
            try:
                pc.cast(pa.array([v]), pa.timestamp("s"))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                if v is not None and re.match(_NUM_RE, v):
                    continue
                raise DataError(
                    f"not a timestamp (Unix seconds or ISO-8601): {v!r}", file=file, field=field,
                    row=line_of(i) if line_of else i + 1,
                ) from None
        raise DataError("mixes numeric and ISO-8601 timestamps", file=file, field=field)
    raise DataError(f"expected timestamps, found column of type {t}", file=file, field=field)


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` from a JSON-lines file (``.gz`` allowed).

    Both strict JSON and the Python-literal dicts of the 2014 Amazon and the Steam dumps are accepted.
    """
    check_nonempty(path)
    any_row = False
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"undecodable bytes (not UTF-8): {raw[max(exc.start - 10, 0): exc.end + 10]!r}",
                    file=path, row=lineno,
                ) from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise DataError(f"not a JSON object: {line[:60]!r}", file=path, row=lineno) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", file=path, row=lineno)
            any_row = True
            yield lineno, record
    if not any_row:
        raise DataError("file has no records", file=path)
