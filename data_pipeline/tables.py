"""Two aligned columns of ``(name, value)`` rows: every summary table the commands print."""

from __future__ import annotations


def format_table(rows: list[tuple[str, str]], indent: str = "") -> str:
    """``(name, value)`` rows as two aligned columns: the end-of-run summary of a job.

    Args:
        rows: The names and their already formatted values.
        indent: Put before every line. Defaults to none.
    """
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{indent}{name.ljust(width)}  {value}" for name, value in rows)
