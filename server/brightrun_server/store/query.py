"""Query helpers shared by the list endpoints: filter comparisons and keyset paging."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from brightrun_server.domain.listing import Comparison

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def compare(column: ColumnElement[Any] | InstrumentedAttribute[Any], comparison: Comparison) -> ColumnElement[bool]:
    result: ColumnElement[bool] = _OPS[comparison.op](column, comparison.value)
    return result


def after_key(
    columns: Sequence[InstrumentedAttribute[Any] | ColumnElement[Any]], key: Sequence[Any], *, descending: bool
) -> ColumnElement[bool]:
    """Rows strictly after `key` in (columns...) order, written as an OR of ANDs so
    each value binds with its column's type and an index on the columns applies."""
    clauses = []
    for i, column in enumerate(columns):
        equal = [columns[j] == key[j] for j in range(i)]
        beyond = column < key[i] if descending else column > key[i]
        clauses.append(and_(*equal, beyond))
    return or_(*clauses)
