"""The self-evaluator without a bus: follows runs look by look and judges them (paper §5).

`SelfEvaluator` holds the calibration set (complete past curves) and judges one `LiveRun` at a
time; the service (main.py) feeds it from NATS and the ledger, the offline replay (replay.py) from
a curves file. Both therefore make exactly the same decisions on the same curves.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.evaluator.calibration import Calibration, Features, Prediction, curve_features, features, look_seed
from services.evaluator.decision import Situation, Verdict, boundary, judge, naive_statistic, threshold
from shared.config import Evaluator as Settings
from shared.curves import Curve


def looks(settings: Settings) -> np.ndarray:
    """The budget fractions at which runs are judged: every look_fraction, before the end of the budget."""
    count = math.ceil(1.0 / settings.look_fraction - 1e-9)
    return np.arange(1, count) * settings.look_fraction


def audited(run_id: str, settings: Settings) -> bool:
    """Whether this run is one of the few never aborted, chosen by its id so every restart agrees."""
    return zlib.crc32(f"audit:{run_id}".encode()) % 10_000 < settings.audit_fraction * 10_000


def _must_finish(run: LiveRun, settings: Settings) -> str | None:
    if run.purpose != "search":
        return f"a {run.purpose} run"
    return "an audit run" if audited(run.run_id, settings) else None


@dataclass
class LiveRun:
    """A run being followed: its curve so far and the features of every look it passed."""

    run_id: str
    used: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    diverged: bool = False
    features: dict[int, Features] = field(default_factory=dict)
    judged_look: int = -1
    """The last look judged (-1: none yet)."""
    purpose: str = "search"
    """The proposal's purpose: only search runs may be aborted (repeats measure noise or confirm a best)."""

    def add(self, used: float, loss: float | None, nonfinite: bool) -> None:
        if nonfinite:
            self.diverged = True
        elif loss is not None and (not self.used or used >= self.used[-1]):
            self.used.append(used)
            self.loss.append(loss)

    @property
    def fraction(self) -> float:
        return self.used[-1] if self.used else 0.0


class SelfEvaluator:
    def __init__(self, settings: Settings, calibration_curves: list[Curve]):
        self.settings = settings
        self.looks = looks(settings)
        self._finals: deque[float] = deque(maxlen=settings.calibration_runs)
        self._table: deque[list[Features | None]] = deque(maxlen=settings.calibration_runs)
        for curve in calibration_curves[-settings.calibration_runs:]:
            self._remember(curve, {})
        self.calibration = self._calibrate()

    @property
    def calibration_runs(self) -> int:
        return len(self._finals)

    def add_complete(self, curve: Curve, run: LiveRun | None = None) -> None:
        """A run finished its whole budget and was judged: it becomes calibration data (with the features
        computed while it was `run`, which are the same)."""
        if curve.complete and curve.used:
            self._remember(curve, run.features if run else {})
            self.calibration = self._calibrate()

    def due_look(self, run: LiveRun) -> int | None:
        """The newest look the run has passed and that is not judged yet."""
        passed = int(np.searchsorted(self.looks, run.fraction + 1e-9)) - 1
        return passed if passed > run.judged_look else None

    def judge(self, run: LiveRun, look: int, bpb_star: float | None, sigma_h: float | None,
              paper: bool = False) -> Verdict:
        """The verdict at `look`; `paper` judges as the paper writes it (looks independent, no guards)."""
        run.judged_look = look
        if run.diverged:
            return Verdict(True, "diverged", "aborted: the train loss is not finite")
        self._note_features(run, look)
        predictions = [p for k in sorted(run.features) if k <= look
                       if (p := self.calibration.predict(k, run.features[k])) is not None]
        situation = Situation(float(self.looks[look]), bpb_star, sigma_h, self.calibration_runs,
                              _must_finish(run, self.settings))
        if paper:
            return self._paper_verdict(predictions, situation)
        return judge(predictions, self.calibration.covariance, situation, self.settings)

    def predict(self, run: LiveRun, look: int) -> Prediction | None:
        """The calibrated forecast at a look the run has been judged at (None if there is none)."""
        feature = run.features.get(look)
        return None if feature is None else self.calibration.predict(look, feature)

    def _note_features(self, run: LiveRun, look: int) -> None:
        used, loss = np.asarray(run.used), np.asarray(run.loss)
        for k in range(look + 1):  # looks skipped between two progress points (or before a restart) too
            if k not in run.features and (feature := features(used, loss, float(self.looks[k]),
                                                              look_seed(run.run_id, k))) is not None:
                run.features[k] = feature

    def _paper_verdict(self, predictions: list[Prediction], situation: Situation) -> Verdict:
        """Eq. (8) with the looks' log-likelihood ratios summed as if independent, from the first forecast."""
        if situation.calibration_runs < self.settings.warmup_runs or situation.bpb_star is None \
                or not situation.sigma_h or not predictions:
            return Verdict(False, "warm-up", "warm-up")
        tau = threshold(situation.bpb_star, situation.sigma_h, self.settings.alpha)
        z = np.array([p.mean for p in predictions])
        std = np.array([p.std for p in predictions])
        statistic = naive_statistic(z, std, tau, self.settings.delta_sigma_h * situation.sigma_h)
        limit = boundary(self.settings.beta)
        abort = statistic >= limit
        return Verdict(abort, "abort" if abort else "continue", f"paper SPRT Λ {statistic:.2f}",
                       predictions[-1], tau, statistic, limit)

    def _remember(self, curve: Curve, known: dict[int, Features]) -> None:
        self._finals.append(float(curve.final_bpb))  # type: ignore[arg-type]
        self._table.append(curve_features(curve, self.looks, known))

    def _calibrate(self) -> Calibration:
        return Calibration(self.looks, np.array(self._finals), list(self._table))

