"""Which file stems can be Dagster partition keys.

>>> partition_key_problem("cats-2026")
>>> partition_key_problem("a...b")
"contains '...', which Dagster reserves for partition ranges"
"""

from __future__ import annotations

MAX_KEY_LENGTH = 200
_FORBIDDEN = {
    "...": "'...', which Dagster reserves for partition ranges",
    ",": "',', which Dagster uses to separate partition keys",
    "[": "'[', which Dagster uses in partition selections",
    "]": "']', which Dagster uses in partition selections",
}


def partition_key_problem(key: str) -> str | None:
    """Why `key` can't be a partition key, or None when it can."""
    if not key.strip():
        return "is blank"
    if len(key) > MAX_KEY_LENGTH:
        return f"is longer than {MAX_KEY_LENGTH} characters"
    for part, why in _FORBIDDEN.items():
        if part in key:
            return f"contains {why}"
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        return "contains a control character"
    return None
