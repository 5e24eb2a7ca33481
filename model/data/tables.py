"""Reading one input file of a mapping: CSV, TSV, Parquet or JSON lines, with errors that name the file.

``Table`` wraps pyarrow: the format from the mapping or the extension, header-less CSV (``columns``),
an explicit delimiter and null markers (``na_values``, only empty cells by default), ids kept as
text, and a row filter that keeps error messages pointing at rows and lines of the file as written.
Time columns become epoch seconds (UTC) and ``time_feature`` derives days, hours, weekdays... from them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contracts.dataset import DatasetError

if TYPE_CHECKING:
    from model.data.mapping import FileSpec

TIME_KINDS: tuple[str, ...] = ("epoch_seconds", "days_since_epoch", "hour_of_day", "day_of_week", "month", "year")
_FORMAT_OF_SUFFIX: dict[str, str] = {
    ".csv": "csv", ".txt": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
}  # fmt: skip


class Table:
    """A CSV/TSV/Parquet/JSONL file read with pyarrow; errors name the file, row and column.

    ``keep`` (``filter_rows``) drops rows, e.g. the non-positives, while error messages keep naming
    rows and lines of the file as written.
    """

    def __init__(self, path: Path, spec: FileSpec, string_columns: set[str], na_values: list[str] | None) -> None:
        try:
            import pyarrow as pa
            import pyarrow.csv as pacsv
            import pyarrow.json as pajson
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise DatasetError(f"{path}: reading CSV/Parquet needs pyarrow (pip install 'unimatch[train]')") from None

        self.path = path
        suffix = path.suffix.lower()
        fmt = spec.format or _FORMAT_OF_SUFFIX.get(suffix)
        if fmt is None:
            what = f"unsupported file type {suffix!r}" if suffix else "no file extension"
            raise DatasetError(
                f'{path}: {what}; expected .csv, .tsv, .parquet or .jsonl, or set "format" '
                "(csv, tsv, parquet, jsonl) for this file in the mapping"
            )
        self.format = fmt
        self.is_csv = fmt in ("csv", "tsv")
        if not self.is_csv and (spec.columns is not None or spec.delimiter is not None):
            key = "columns" if spec.columns is not None else "delimiter"
            raise DatasetError(f'{path}: "{key}" applies to csv/tsv files only; this one is read as {fmt}')
        # the line of data row 0: 2 under a header, 1 without one (and in JSONL)
        self.first_line = 2 if self.is_csv and spec.columns is None else 1
        if not path.is_file():
            raise DatasetError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: empty file")
        nulls = spec.na_values if spec.na_values is not None else (na_values if na_values is not None else [""])
        try:
            if self.is_csv:
                self.table = pacsv.read_csv(
                    path,
                    read_options=pacsv.ReadOptions(column_names=spec.columns),
                    parse_options=pacsv.ParseOptions(delimiter=spec.delimiter or ("\t" if fmt == "tsv" else ",")),
                    # ids and labels stay strings: "007" and "7" are different ids
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in string_columns},
                        null_values=nulls,
                        strings_can_be_null=True,
                    ),
                )
            elif fmt == "jsonl":
                self.table = pajson.read_json(path)
            else:
                self.table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            msg = " ".join(str(exc).split())
            line = _bad_csv_line(path, msg) if self.is_csv else None
            at = f": line {line}" if line is not None else ""
            raise DatasetError(f"{path}{at}: cannot read as {fmt} ({msg})") from None
        if self.table.num_rows == 0:
            raise DatasetError(f"{path}: no data rows")
        self.rows = np.arange(self.table.num_rows)  # file row of each kept row

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def where(self, row: int) -> str:
        """``file: row N (line M)``: 1-based data row of the file, and its line (CSV counts the header)."""
        r = int(self.rows[row])
        return f"{self.path}: row {r + 1}" + (f" (line {r + self.first_line})" if self.format != "parquet" else "")

    def filter_rows(self, keep: np.ndarray) -> None:
        import pyarrow as pa

        self.table = self.table.filter(pa.array(keep))
        self.rows = self.rows[keep]

    def require(self, columns: list[str], role: str) -> None:
        have = self.table.column_names
        for c in columns:
            if c not in have:
                hint = (
                    '; a header-less file needs "columns" in the mapping' if self.is_csv and self.first_line == 2 else ""
                )
                raise DatasetError(
                    f"{self.path}: missing column {c!r} ({role}); the file has columns {have}{hint}"
                )

    def strings(self, column: str, *, required: bool) -> np.ndarray:
        """Column as a numpy str array; None where null. ``required`` makes a null an error."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.table.column(column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            if pa.types.is_floating(col.type):
                # 3.0 -> "3": ids and labels written as floats (a CSV column with a gap) still match
                whole = pc.equal(col, pc.floor(col))
                if pc.all(pc.fill_null(whole, True)).as_py():
                    col = pc.cast(col, pa.int64())
            try:
                col = pc.cast(col, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DatasetError(
                    f"{self.path}: column {column!r}: expected text or numbers, got {col.type}"
                ) from None
        if required and col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{self.where(row)}: column {column!r} is empty; expected a value")
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)

    def numbers(self, column: str) -> np.ndarray:
        """Column as float64 with NaN for missing; a non-numeric value is an error naming its row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.table.column(column)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            raw = col.to_pylist()
            out = np.empty(len(raw), dtype=np.float64)
            for i, v in enumerate(raw):
                try:
                    out[i] = np.nan if v is None or v == "" else float(v)
                except ValueError:
                    hint = _TIME_HINT if _parse_time(v) is not None else ""
                    raise DatasetError(
                        f"{self.where(i)}: column {column!r}: expected a number, got {v!r}{hint}"
                    ) from None
            return out
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            raise DatasetError(f"{self.path}: column {column!r}: expected numbers, got dates ({col.type}){_TIME_HINT}")
        raise DatasetError(f"{self.path}: column {column!r}: expected numbers, got values of type {col.type}")

    def times(self, column: str, time_format: str | None = None) -> np.ndarray:
        """Column as float64 epoch seconds (UTC), NaN where null.

        Integers, floats, ISO-8601 strings, Parquet/JSON timestamps and dates; ``time_format`` (a
        strptime pattern, e.g. ``%Y%m%d``) for other strings and for integers written as dates.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.table.column(column)
        if time_format is not None:
            text = pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col
            try:
                parsed = pc.strptime(text, format=time_format, unit="s", error_is_null=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DatasetError(f"{self.path}: column {column!r}: time_format {time_format!r}: {exc}") from None
            bad = np.asarray(pc.and_(pc.is_null(parsed), pc.invert(pc.is_null(text))).to_numpy(zero_copy_only=False))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DatasetError(
                    f"{self.where(row)}: column {column!r}: {text[row].as_py()!r} does not match time_format {time_format!r}"
                )
            col = parsed
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            tz = col.type.tz if pa.types.is_timestamp(col.type) else None
            # safe=False truncates sub-second precision instead of refusing it; epoch seconds are UTC
            secs = pc.cast(pc.cast(col, pa.timestamp("s", tz=tz), safe=False), pa.int64())
            return np.asarray(pc.cast(secs, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            x = np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
            if np.isinf(x).any():
                row = int(np.flatnonzero(np.isinf(x))[0])
                raise DatasetError(f"{self.where(row)}: column {column!r}: expected a finite timestamp, got {x[row]}")
            return np.rint(x)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out = np.empty(len(col), dtype=np.float64)
            for i, v in enumerate(col.to_pylist()):
                if v is None:
                    out[i] = np.nan
                    continue
                t = _parse_time(v)
                if t is None:
                    raise DatasetError(
                        f"{self.where(i)}: column {column!r}: expected a number or an ISO-8601 time, got {v!r}"
                        " (or give a time_format)"
                    )
                out[i] = t
            return out
        raise DatasetError(f"{self.path}: column {column!r}: expected timestamps, got values of type {col.type}")

    def timestamps(self, column: str, time_format: str | None = None) -> np.ndarray:
        """Column as int64 epoch seconds; a missing time is an error naming its row."""
        x = self.times(column, time_format)
        if np.isnan(x).any():
            row = int(np.flatnonzero(np.isnan(x))[0])
            raise DatasetError(f"{self.where(row)}: column {column!r} is empty; expected a timestamp")
        return x.astype(np.int64)


def _bad_csv_line(path: Path, message: str) -> int | None:
    """The 1-based line a pyarrow CSV row-length error quotes ("Expected 4 columns, got 2: u2,a1")."""
    m = re.search(r"Expected \d+ columns, got \d+: (.*)$", message)
    if m is None:
        return None
    quoted = m.group(1).strip()
    with open(path, errors="replace") as fh:
        for n, text in enumerate(fh, start=1):
            if text.rstrip("\r\n").strip() == quoted:
                return n
    return None


_TIME_HINT = (
    '; for a date/time column declare its "type" in the mapping: '
    + ", ".join(TIME_KINDS)
)


def time_feature(seconds: np.ndarray, kind: str) -> np.ndarray:
    """float64 ``kind`` of epoch seconds (UTC), NaN stays NaN. day_of_week: Monday = 0."""
    ok = np.isfinite(seconds)
    out = np.full(seconds.shape, np.nan)
    s = seconds[ok]
    days = np.floor(s / 86400.0)
    if kind == "epoch_seconds":
        out[ok] = s
    elif kind == "days_since_epoch":
        out[ok] = days
    elif kind == "hour_of_day":
        out[ok] = np.floor(s / 3600.0) % 24
    elif kind == "day_of_week":
        out[ok] = (days + 3) % 7  # 1970-01-01 was a Thursday
    else:
        months = days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)  # months since 1970-01
        out[ok] = months % 12 + 1 if kind == "month" else months // 12 + 1970
    return out


def _parse_time(value: str) -> int | None:
    """Epoch seconds of a numeric or ISO-8601 string; None when it is neither."""
    try:
        return int(round(float(value)))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # naive times are read as UTC, the usual log convention
    return int(t.timestamp())
