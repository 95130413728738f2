"""Frozen environment of the GPU target. DO NOT EDIT: the agent may change only train.py.

nanochat-sized pretraining on one GPU: BPE 8192, context 512, a 5-minute training budget, val-bpb
(eq. 1) measured in a separate process. The corpus defaults to the offline stdlib corpus; on a
machine with internet, `autoresearch target download climbmix --shards 8` fetches real web text,
and `corpus=` below can point at that folder.
"""

from shared.target import TargetConfig, session

CONFIG = TargetConfig(
    time_budget_s=300,  # T_max: training seconds per experiment (paper §7.1)
    seq_len=512,  # context length of every training and evaluation window (paper §7.1)
    corpus="stdlib",  # or a folder of parquet shards with a `text` column
    tokenizer="bpe:8192",  # byte-level BPE trained on the train split
    device="cuda",
    eval_tokens=2_097_152,  # val tokens scored by eq. (1), fewer if the val split is smaller
    eval_batch=32,
    excluded_warmup_steps=10,  # torch.compile warm-up is not charged to the budget
    startup_allowance_s=300,
    eval_allowance_s=600,
    progress_interval_s=5.0,
)

__all__ = ["CONFIG", "session"]
