"""The eval sets shipped inside the package: name -> JSONL file under s2d_cli/bundled/.

Its own module (no imports) so that both `data` (which loads them) and `artifacts` (which hashes a
bundled name given as an input) can read the table without importing each other.
"""
from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED = {
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "gsm8k": "gsm8k.jsonl",
}
