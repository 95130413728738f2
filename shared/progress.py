"""Progress bars for the long operations (preparing a target's data, building the default policy model, replaying
the ledger's event log): on stderr, and only where someone watches it.

A bar is drawn when stderr is a terminal, or when asked (`autoresearch --progress`, or AUTORESEARCH_PROGRESS=1);
AUTORESEARCH_PROGRESS=0 (`--no-progress`) silences it even on a terminal. A service sets it to 0: its stderr is a
log, and a bar's carriage returns would be garbage there, as in CI output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

ENV = "AUTORESEARCH_PROGRESS"
T = TypeVar("T")


def wanted() -> bool:
    """Whether to draw a bar now: asked for or refused by AUTORESEARCH_PROGRESS, else only on a terminal."""
    asked = os.environ.get(ENV, "").strip()
    if asked:
        return asked not in ("0", "false", "no")
    return sys.stderr.isatty()


def bar(iterable: Iterable[T] | None = None, quiet: bool = False, **options: object) -> tqdm:
    """tqdm on stderr, drawn only when `wanted()` and not `quiet`; at most one redraw a second, so that a bar asked
    for in a pipe stays small."""
    return tqdm(iterable, file=sys.stderr, disable=quiet or not wanted(), mininterval=1.0,
                **options)  # type: ignore[arg-type]
