"""The frozen research environment: what an experiment is measured by, and the harness that measures it.

Targets' `prepare.py` files import from here; `train.py` files import only from their `prepare.py`.
"""

from shared.target.config import TargetConfig
from shared.target.runtime import Session, session

__all__ = ["Session", "TargetConfig", "session"]
