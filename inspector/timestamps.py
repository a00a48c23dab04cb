"""The one timestamp format the project writes: RFC 3339, UTC, milliseconds, a `Z`.

Results, announcements, manifests and published captures all carry it, so a dashboard or a
downstream parser sees one shape everywhere.
"""

from __future__ import annotations

from datetime import datetime, timezone


def rfc3339(moment: datetime) -> str:
    """`2026-11-28T10:15:00.123Z`: the moment in UTC (a naive one is taken as UTC already)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    """Now, as `rfc3339` writes it."""
    return rfc3339(datetime.now(timezone.utc))
