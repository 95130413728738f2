"""Training curves of finished runs: what the evaluator calibrates on and the offline replay replays.

The ledger answers `ledger.curves` with them (built from its run.progress events), and
`autoresearch evaluator record` writes them to a JSON-lines file, one curve per line, in the
order the runs finished, so a replay sees bpb* move exactly as the loop saw it.
"""

from __future__ import annotations

from pathlib import Path

import msgspec


class Curve(msgspec.Struct, frozen=True, kw_only=True):
    """One run's train-loss curve against the fraction of its budget spent, and how it ended."""

    run_id: str
    proposal_id: str
    finished_seq: int
    status: str
    final_bpb: float | None
    """val-bpb of the frozen evaluation (ok runs only)."""
    budget: str
    """The run's budget, e.g. "30 seconds"."""
    training_s: float
    total_s: float
    """Wall-clock seconds of the whole run: start-up, training, export and evaluation."""
    used: list[float]
    """budget_used of each progress point: fraction of the budget spent, increasing, in [0, 1]."""
    loss: list[float]
    """The train loss reported at each point (finite; the latest minibatch's, so noisy)."""
    diverged: bool = False
    """The run reported a non-finite loss."""

    @property
    def complete(self) -> bool:
        """Trained to the end of its budget and judged: the only curves a forecast can learn from."""
        return self.status == "ok" and self.final_bpb is not None


class CurvesRequest(msgspec.Struct, frozen=True):
    limit: int = 1000
    """The most recent finished runs at most."""
    complete_only: bool = True
    after_seq: int = 0


class CurvesReply(msgspec.Struct, frozen=True):
    curves: list[Curve]
    """Oldest first, in the order the runs finished."""


def write_curves(path: Path, curves: list[Curve]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = msgspec.json.Encoder()
    path.write_bytes(b"".join(encoder.encode(curve) + b"\n" for curve in curves))


def read_curves(path: Path) -> list[Curve]:
    """The curves of a file written by write_curves, in file order; a bad line is an error naming it."""
    decoder = msgspec.json.Decoder(Curve)
    curves = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            curves.append(decoder.decode(line))
        except msgspec.DecodeError as error:
            raise ValueError(f"{path}:{number}: not a curve: {error}") from None
    return curves
