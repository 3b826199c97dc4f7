"""Shared benchmark and training data: Spec-Bench questions, GSM8K, read from ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import GearshiftError


def data_dir() -> Path:
    """The shared data folder: $GEARSHIFT_DATA, else ../shared/data next to the checkout."""
    candidates = [
        os.environ.get("GEARSHIFT_DATA"),
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[4] / "shared" / "data",
    ]
    for c in candidates:
        if c and (Path(c) / "spec_bench" / "question.jsonl").exists():
            return Path(c)
    raise GearshiftError(
        "Spec-Bench data not found: set GEARSHIFT_DATA to the folder holding spec_bench/question.jsonl"
    )


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file; an unreadable file is a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise GearshiftError(f"cannot read {path}: {e}") from None


def spec_bench_questions(limit: int | None = None) -> list[dict]:
    rows = read_jsonl(data_dir() / "spec_bench" / "question.jsonl")
    return rows[:limit] if limit else rows
