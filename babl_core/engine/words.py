"""Words users read: counts with the right plural ("1 token", "2 tokens")."""

from __future__ import annotations


def count(number: int, noun: str, plural: str | None = None) -> str:
    """`number` and `noun`, plural unless the number is exactly one: count(1, "token") -> "1 token".

    Args:
        number: how many.
        noun: the singular.
        plural: the plural when it is not `noun` + "s" (e.g. count(2, "entry", "entries")).
    """
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
