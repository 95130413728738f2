"""The frozen research environment: what an experiment is measured by, and the harness that measures it.

Targets' `prepare.py` files import from here; `train.py` files import only from their `prepare.py`.
The session (and torch with it) loads on first use, so services that only read run records
(the ledger, the proposer) do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.target.config import TargetConfig

if TYPE_CHECKING:
    from shared.target.runtime import Session, session

__all__ = ["Session", "TargetConfig", "session"]


def __getattr__(name: str) -> Any:
    if name in ("Session", "session"):
        from shared.target import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'shared.target' has no attribute {name!r}")
