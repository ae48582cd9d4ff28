"""Deterministic job output: every value is a pure function of the request or the job id."""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Sequence

DEFAULT_QUERY_MODEL = "reference-llm"
DEFAULT_EMBEDDING_MODEL = "reference-embedding"


def word_count(text: str) -> int:
    return len(text.split())


def answer_text(prompt: str, collections: Sequence[str] = ()) -> str:
    """The reference "model" output; RAG answers name the collections they drew on."""
    if collections:
        return f"Reference answer to: {prompt} (from collections: {', '.join(collections)})"
    return f"Reference answer to: {prompt}"


def split_deltas(text: str, parts: int) -> list[str]:
    """Split ``text`` into at most ``parts`` non-empty chunks that concatenate back to it."""
    parts = max(1, min(parts, len(text))) if text else 1
    bounds = [len(text) * i // parts for i in range(parts + 1)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [text]


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit-free vector in [-1, 1) from chained sha256 blocks of the text."""
    values: list[float] = []
    block = 0
    while len(values) < dim:
        digest = hashlib.sha256(f"{block}:{text}".encode()).digest()
        for (word,) in struct.iter_unpack(">I", digest):
            values.append(word / 2**31 - 1.0)
        block += 1
    return values[:dim]


def job_fraction(job_id: str, salt: str) -> float:
    """A stable number in [0, 1) per job id; compared with a rate to pick failing jobs."""
    digest = hashlib.sha256(f"{salt}:{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fails(job_id: str, rate: float) -> bool:
    return job_fraction(job_id, "fail") < rate


def is_silent(job_id: str, rate: float) -> bool:
    return job_fraction(job_id, "silent") < rate
