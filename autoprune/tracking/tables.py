"""Rows as text for MLflow: configs as params, tables as CSV and Markdown, histories as CSV.

Pure functions (no MLflow): :func:`flatten` turns a nested config into the run's params,
:func:`csv_text` and :func:`markdown_table` render comparison tables (``<name>.csv`` /
``<name>.md``), and :func:`history_rows` lays a search's history out as ``history.csv``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoprune.tracking.records import RecordView

MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit per param value (mlflow.utils.validation)
CSV_COLUMNS = (
    "index",
    "accuracy",
    "loss",
    "flops_ratio",
    "params_ratio",
    "latency_ratio_table",
    "reward",
    "meets_budget",
    "cached",
    "partial",
    "eval_seconds",
    "elapsed",
    "note",
)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` with values cut to MLflow's param limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_VALUE_LENGTH]
    return out


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV with a header; missing and None values are empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _markdown_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as a Markdown table (floats to 4 significant digits, ``|`` escaped)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of the rows' keys in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def history_rows(records: Sequence[RecordView]) -> tuple[list[dict[str, Any]], list[str]]:
    """CSV rows of a history: the scalar fields (booleans as 0/1) plus ``ratio.<unit>``."""
    units = list(dict.fromkeys(unit for r in records for unit in r.ratios))
    rows = []
    for record in records:
        row: dict[str, Any] = {c: getattr(record, c) for c in CSV_COLUMNS}
        row["meets_budget"], row["cached"] = int(record.meets_budget), int(record.cached)
        row["partial"] = int(record.partial)
        row.update({f"ratio.{unit}": ratio for unit, ratio in record.ratios.items()})
        rows.append(row)
    return rows, [*CSV_COLUMNS, *(f"ratio.{unit}" for unit in units)]
