"""Record files for the tests that read them (``bench.store``) and report them (``bench.report``)."""

from __future__ import annotations

import json


def record_json(record: dict, **raw_fields: str) -> str:
    """``record`` as a schema-2 record's JSON, with each of ``raw_fields`` set to a raw JSON literal (``NaN``,
    ``1e400``, ``"abc"``) that ``json.dumps`` would not write."""
    text = json.dumps({"schema_version": 2, **record, **{key: f"@{key}@" for key in raw_fields}})
    for key, literal in raw_fields.items():
        text = text.replace(f'"@{key}@"', literal)
    return text
