"""Entry point of the evaluation process: judge an exported model on the val split.

    python -m shared.target.evaluate <context.json>

Loads the model train.py handed in (a torch.export graph: tensor operations and weights, no code
from train.py), runs the causality probe, then eq. (1). Prints one JSON line: the Evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import numpy as np
import torch

from shared.target.bpb import EvaluationError, bits_per_byte, causality_probe, val_windows
from shared.target.confine import confine_run
from shared.target.records import RunContext, Status


class Evaluation(msgspec.Struct, frozen=True, kw_only=True):
    status: Status
    val_bpb: float | None = None
    eval_tokens: int = 0
    error: str | None = None


def evaluate(context: RunContext) -> Evaluation:
    torch.set_num_threads(context.cpu_threads)
    # The exported graph runs as it was traced, in float32 (autocast would break its dtype checks);
    # TF32 matmuls on CUDA keep that fast.
    torch.set_float32_matmul_precision("high")
    model = torch.export.load(context.model_path).module()
    windows = val_windows(np.memmap(context.val_bin, dtype=np.dtype(context.dtype), mode="r"),
                          context.seq_len, context.eval_tokens)
    probe = causality_probe(model, windows, context.vocab_size, context.eval_batch, context.seed, context.device)
    if not probe.causal:
        return Evaluation(status="rejected", error=f"causality probe failed: {probe.detail}")
    token_bytes = torch.from_numpy(np.load(context.token_bytes))
    result = bits_per_byte(model, windows, token_bytes, context.eval_batch, context.device)
    return Evaluation(status="ok", val_bpb=result.bpb, eval_tokens=result.tokens)


def main(context_path: str) -> int:
    context = msgspec.json.decode(Path(context_path).read_bytes(), type=RunContext)
    confine_run(context, read=[context.val_bin, context.token_bytes, context.model_path],
                write=[f"{context.workspace}/tmp"])
    try:
        outcome = evaluate(context)
    except EvaluationError as error:
        outcome = Evaluation(status="crashed", error=str(error))
    sys.stdout.buffer.write(msgspec.json.encode(outcome) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
