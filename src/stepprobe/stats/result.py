"""The one result protocol: every estimate travels with its errors (statsmodels' results).

A result (``Measurement``, ``Influence``, ``Comparison``, ``RemovalCheck``,
``Regression``) has

- ``.table``: a DataFrame, one row per estimate, with the columns of ``COLUMNS`` where they
  apply — ``estimate``, its standard error ``se``, the degrees of freedom ``df`` of its
  t interval [``ci_low``, ``ci_high``], the ``estimator`` that made it and the ``noise``
  model its standard error covers — plus what identifies the row;
- ``.summary()``: a string for people;
- ``.to_parquet(path)``: the table, written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pandas as pd

from ..core.io import write_parquet

COLUMNS = ("estimate", "se", "df", "ci_low", "ci_high", "estimator", "noise")


class Result:
    """Base of the results: subclasses are dataclasses with a ``table`` field."""

    table: pd.DataFrame
    # the columns summary() shows, in order (those the table has); empty: all
    SHOWN: ClassVar[tuple[str, ...]] = ()

    def headline(self) -> str:
        return f"{type(self).__name__}: {len(self.table)} row(s)"

    def summary(self) -> str:
        cols = [c for c in self.SHOWN if c in self.table] or list(self.table.columns)
        body = self.table[cols].to_string(index=False) if len(self.table) else "(no rows)"
        return f"{self.headline()}\n{body}"

    def to_parquet(self, path: str | os.PathLike) -> Path:
        return write_parquet(path, self.table)
