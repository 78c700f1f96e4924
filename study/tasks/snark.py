"""The persona task, "snark": dry, sarcastic wit that still answers correctly and helpfully.

The dataset lives in `snark_data/<domain>.jsonl` (12 domains x 26 prompts), each row a prompt with a
persona answer and a neutral answer carrying the same content. Fixed splits:

    heldout domains  history, animals, music     never trained on (out-of-domain generalisation)
    in-domain test   ids 23-26 of every other domain   unseen prompts from the training domains
    train            ids 01-22 of every other domain

The marker lexicon below is the trait's *surface* channel: GRPO's reward uses it, so any indicator
built on it is labelled as the rewarded channel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "snark_data"
HELDOUT_DOMAINS = ("history", "animals", "music")
IN_DOMAIN_TEST_FROM = 23  # ids >= 23 of training domains are unseen in-domain test prompts

MARKERS = (
    "oh,", "obviously", "shocking", "shockingly", "congratulations", "brace yourself", "spoiler",
    "who knew", "groundbreaking", "apparently", "of course", "naturally", "clearly", "what a concept",
    "bold move", "plot twist", "revolutionary", "news flash", "alas", "riveting", "thrilling", "truly",
    "wow", "sure,", "stunning",
)  # fmt: skip

# Longest first so "shockingly" is matched before "shocking"; word boundaries so "wow" is not in "swow".
_MARKER_RE = re.compile(
    r"(?<![a-z])(" + "|".join(re.escape(m) for m in sorted(MARKERS, key=len, reverse=True)) + r")(?![a-z])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Row:
    id: str
    domain: str
    prompt: str
    persona: str
    neutral: str

    @property
    def number(self) -> int:
        return int(self.id.rsplit("-", 1)[1])


@lru_cache(maxsize=8)
def load_rows(folder: Path | None = None) -> tuple[Row, ...]:
    folder = Path(folder or DATA)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no <domain>.jsonl files in {folder}")
    rows = []
    for file in files:
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(Row(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(
                    f"{file}:{lineno}: expected a JSON object with id, domain, prompt, persona, neutral ({e})"
                ) from None
    return tuple(rows)


def split_of(row: Row, heldout_domains: tuple[str, ...] = HELDOUT_DOMAINS) -> str:
    """`train`, `test_in` (unseen prompt, training domain) or `heldout` (held-out domain)."""
    if row.domain in heldout_domains:
        return "heldout"
    return "test_in" if row.number >= IN_DOMAIN_TEST_FROM else "train"


def marker_count(text: str) -> int:
    return len(_MARKER_RE.findall(text))


def strip_markers(text: str) -> str:
    """Remove every lexicon marker (and the space it leaves), keeping the rest of the sentence."""
    out = _MARKER_RE.sub("", text)
    out = re.sub(r"\s+([,.!?:;])", r"\1", out)
    out = re.sub(r"(?<=[.!?])[,.:;!?]+", "", out)  # punctuation orphaned by a removed marker ("fell.,.")
    out = re.sub(r"^[\s,.:;!?]+", "", out)
    return re.sub(r"\s{2,}", " ", out).strip()
