"""Reading a TSV / CSV list (URL lists, caption files) as string columns, or one error naming the file and line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence

import fsspec
import pandas as pd


def read_delimited(uri: str, sep: str, *, names: Sequence[str] | None = None, what: str = "file") -> pd.DataFrame:
    """``uri`` as a DataFrame of strings (header row unless ``names`` are given); ValueError on a bad line."""
    kw = {"header": None, "names": list(names)} if names is not None else {}
    try:
        return pd.read_csv(uri, sep=sep, dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False, **kw)
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected \d+ fields in line \d+, saw \d+", str(exc))
        raise ValueError(f"{what} {uri!r}: {m.group(0) if m else exc}: a field holds the separator "
                         f"{sep!r} (inside a caption?); remove it there, or give the list as Parquet / JSONL"
                         ) from None
    except UnicodeDecodeError as exc:
        line, col = first_non_utf8(uri)
        raise ValueError(f"{what} {uri!r}: line {line} is not UTF-8 ({exc.reason}, byte {col} of the line); "
                         "re-encode the file as UTF-8") from None


def first_non_utf8(uri: str) -> tuple[int, int]:
    """(1-based line, 0-based byte in that line) of the first bytes of ``uri`` that are not UTF-8; (0, 0) if none."""
    with fsspec.open(uri, "rb", compression="infer") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return n, exc.start
    return 0, 0
