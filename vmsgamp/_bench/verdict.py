"""Targets and their verdicts, shared by every ``vmsgamp bench`` suite.

A verdict is a plain dict (it goes into ``--json`` output as is)::

    {"target": "bus PING round trip p50 <= 5 us", "value": 3.1, "unit": "us",
     "limit": 5.0, "at_least": False, "status": "PASS", "detail": ""}

``status`` is PASS, MISS, or n/a when the figure was not measured (a
skipped part, a missing C compiler): never a silent pass.  A figure shown
for information, with no stated target, has ``limit`` None and status info.
"""
from __future__ import annotations

from typing import Any

Verdict = dict[str, Any]

__all__ = ["Verdict", "check", "format_lines", "summary"]


def check(target: str, value: float | None, limit: float | None, *, at_least: bool = False,
          unit: str = "", detail: str = "") -> Verdict:
    """PASS when ``value <= limit`` (``value >= limit`` with ``at_least``)."""
    if value is None:
        status = "n/a"
    elif limit is None:
        status = "info"
    else:
        status = "PASS" if (value >= limit if at_least else value <= limit) else "MISS"
    return {"target": target, "value": value, "unit": unit, "limit": limit, "at_least": at_least,
            "status": status, "detail": detail}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def format_lines(verdicts: list[Verdict]) -> list[str]:
    """One line per target: ``verdict PASS  <target>: measured <value>``."""
    lines = []
    for v in verdicts:
        extra = f" ({v['detail']})" if v.get("detail") else ""
        lines.append(f"verdict {v['status']:4s}  {v['target']}: measured {_fmt(v['value'], v['unit'])}{extra}")
    return lines


def summary(verdicts: list[Verdict]) -> dict[str, int]:
    """How many targets passed, missed and were not measured."""
    out = {"PASS": 0, "MISS": 0, "n/a": 0, "info": 0}
    for v in verdicts:
        out[v["status"]] = out.get(v["status"], 0) + 1
    return out
