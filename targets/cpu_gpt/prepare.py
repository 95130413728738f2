"""Frozen environment of the CPU target. DO NOT EDIT: the agent may change only train.py.

The data (the offline stdlib corpus, BPE 2048, a fixed 5% val split), the sequence length, the
time budget and the evaluation (val-bpb, eq. 1, in a separate process) are fixed here so that every
experiment is judged on the same terms. train.py gets its data and clock from `session()`.
"""

from shared.target import TargetConfig, session

CONFIG = TargetConfig(
    time_budget_s=30,  # T_max: training seconds per experiment on two CPU cores
    seq_len=128,  # context length of every training and evaluation window
    corpus="stdlib",  # the Python standard library's sources: on every machine, offline
    tokenizer="bpe:2048",  # byte-level BPE trained on the train split
    device="cpu",
    cpu_threads=2,
    eval_tokens=65_536,  # val tokens scored by eq. (1)
    eval_batch=64,
    excluded_warmup_steps=1,
    startup_allowance_s=60,
    eval_allowance_s=120,
    progress_interval_s=1.0,
)

__all__ = ["CONFIG", "session"]
