"""Flag explanations: the section of ``docs/EVALUATION.md`` named after a flag id."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "EVALUATION.md"
DOC_NAME = "docs/EVALUATION.md"


@cache
def sections(doc: Path = DOC) -> dict[str, str]:
    """Heading id -> the section's text (without its heading), for every ``##`` section."""
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError:
        return {}
    out: dict[str, str] = {}
    parts = re.split(r"^##\s+(.+?)\s*$", text, flags=re.M)
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        body = re.split(r"^#\s", body, flags=re.M)[0]
        out[title.strip().lower()] = body.strip()
    return out


def explanation(flag_id: str) -> str:
    """The documentation of ``flag_id`` (its first paragraphs, as plain text), or a pointer to the
    docs when this installation has no copy of them."""
    body = sections().get(flag_id.lower(), "")
    if not body:
        return f"see {DOC_NAME}#{flag_id}"
    plain = re.sub(r"[*`]", "", body)
    paragraphs = [" ".join(p.split()) for p in plain.split("\n\n") if p.strip()]
    return "\n".join(paragraphs[:3])
