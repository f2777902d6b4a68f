"""`synthval leaderboard`: the results store as one table (text, CSV or JSON), printed or written to a URI."""

from __future__ import annotations

import logging
from typing import Any

from synthval.errors import ConfigError
from synthval.io import storage
from synthval.results.leaderboard import build_leaderboard, format_table, to_csv, to_json
from synthval.results.store import open_store

log = logging.getLogger(__name__)


def run_leaderboard(db_url: str, *, out_uri: str | None = None, output_format: str = "table",
                    **options: Any) -> dict[str, Any]:
    """Print the leaderboard of the store at `db_url`; with `out_uri` also write it there (CSV or JSON)."""
    if output_format not in ("table", "csv", "json"):
        raise ConfigError(f"leaderboard: format {output_format!r} is unknown; expected table, csv or json")
    entries = build_leaderboard(open_store(db_url).rows(with_records=False), **options)
    table = format_table(entries, options.get("baseline") is not None) + "\n"
    text = {"table": table, "csv": to_csv(entries), "json": to_json(entries)}[output_format]
    if out_uri:
        storage.write_text(out_uri, text)
        log.info("leaderboard (%d entries, written to %s):\n%s", len(entries), out_uri, table)
    else:
        print(text, end="", flush=True)
    return {"entries": len(entries), **({"leaderboard_uri": out_uri} if out_uri else {})}

