"""What went wrong in a captioning run, for the top of ``clipcap report``: captions that match none of their
references, empty or looping captions, and the lowest CLIPScores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipcap_core.metrics import normalize_caption

LOOP_MAX_NGRAM = 4  # a loop is an n-gram (n <= 4) repeated back to back: "red red red", "a dog a dog"


@dataclass
class Failures:
    source: str                       # "evaluation" (every evaluated image) or "sample" (the gallery's)
    checked: int                      # rows looked at
    with_references: int              # rows that had a reference to compare with
    mismatches: list[dict[str, Any]] = field(default_factory=list)   # worst first, at most ``shown``
    mismatch_count: int = 0
    degenerate: list[dict[str, Any]] = field(default_factory=list)   # empty or looping (``why`` says which)
    degenerate_count: int = 0
    lowest_clip: list[dict[str, Any]] = field(default_factory=list)  # lowest CLIPScore first

    @property
    def any(self) -> bool:
        return bool(self.mismatch_count or self.degenerate_count)


def loop_of(caption: str) -> str | None:
    """The repeated n-gram when ``caption`` loops (a word 3 times in a row, or a 2..4-gram twice), else None."""
    words = normalize_caption(caption).split()
    for n in range(1, LOOP_MAX_NGRAM + 1):
        times = 3 if n == 1 else 2
        for i in range(len(words) - n * times + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, times)):
                return " ".join(gram)
    return None


def degenerate_reason(caption: str | None) -> str | None:
    """Why a caption is useless whatever the references: empty, or looping; None when it is neither."""
    if not (caption or "").strip():
        return "empty caption"
    gram = loop_of(caption or "")
    return f"loops on {gram!r}" if gram else None


def matches_reference(caption: str, references: list[str]) -> bool:
    """True when ``caption`` equals one of ``references`` after normalisation (``clipcap evaluate``'s exact match)."""
    return normalize_caption(caption) in {normalize_caption(r) for r in references}


def is_mismatch(row: dict[str, Any]) -> bool:
    """A row with references whose caption matches none of them (its exact_match, or computed here)."""
    refs = row.get("references") or []
    if not refs:
        return False
    if row.get("exact_match") is not None:
        return row["exact_match"] < 0.5
    return not matches_reference(row.get("caption") or "", refs)


def _badness(row: dict[str, Any]) -> tuple[float, float]:
    """Sort key, worst first: lowest CIDEr, then lowest CLIPScore (missing scores sort last)."""
    cider, clip = row.get("cider"), row.get("clip_score")
    return (cider if cider is not None else float("inf"), clip if clip is not None else float("inf"))


def find_failures(rows: list[dict[str, Any]], *, source: str, shown: int = 50, lowest: int = 5) -> Failures:
    """Mismatches, degenerate captions and the ``lowest`` CLIPScores among ``rows`` (lists cut to ``shown``)."""
    for row in rows:
        row["why"] = degenerate_reason(row.get("caption"))
    bad = sorted((r for r in rows if is_mismatch(r)), key=_badness)
    odd = sorted((r for r in rows if r["why"]), key=_badness)
    scored = sorted((r for r in rows if r.get("clip_score") is not None), key=lambda r: r["clip_score"])
    return Failures(source=source, checked=len(rows), with_references=sum(bool(r.get("references")) for r in rows),
                    mismatches=bad[:shown], mismatch_count=len(bad), degenerate=odd[:shown],
                    degenerate_count=len(odd), lowest_clip=scored[:lowest])


def row_flags(row: dict[str, Any]) -> list[str]:
    """What is wrong with one caption row, for its gallery card ([] when nothing is)."""
    flags = ["matches no reference"] if is_mismatch(row) else []
    why = degenerate_reason(row.get("caption"))
    return flags + ([why] if why else [])


def worst_first(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of ``rows`` worst first: flagged rows, then by lowest CIDEr and CLIPScore, then by id."""
    return sorted(range(len(rows)), key=lambda i: (not row_flags(rows[i]), *_badness(rows[i]),
                                                   str(rows[i].get("image_id"))))
