"""The one configuration every service reads: `autoresearch.toml`, then environment overrides.

    AUTORESEARCH_CONFIG=path/to/file.toml      another file (default: ./autoresearch.toml; absent = defaults)
    AUTORESEARCH_EXECUTOR_SLOTS=2              any key, as AUTORESEARCH_<SECTION>_<KEY>

The defaults are the offline 2-core CPU stack: an embedded nats-server, the CPU target, one executor slot.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

ENV_PREFIX = "AUTORESEARCH_"
NOT_SETTINGS = ("CONFIG", "DATA", "LOG_LEVEL", "PROGRESS")
"""AUTORESEARCH_<these> are read elsewhere: this file's path, the data root (shared/target/data.py), the log level,
progress bars (shared/progress.py)."""
DEFAULT_FILE = "autoresearch.toml"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class Stack(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = ".data"
    """NATS storage, the ledger file, the stack's pid file."""
    target: str = "targets/cpu_gpt"
    """The research target folder (targets/README.md)."""


class Nats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    servers: str = ""
    """Comma-separated URLs of external servers (a cluster); empty starts the embedded nats-server."""
    port: int = 4222
    """Port of the embedded server."""
    replicas: int = 1
    """Stream replicas: 3 on a 3-node cluster (deploy/)."""

    @property
    def urls(self) -> list[str]:
        return [url.strip() for url in self.servers.split(",") if url.strip()] or [f"nats://127.0.0.1:{self.port}"]


class Ledger(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    http_port: int = 8765
    """The read-only HTTP API (SQL, state)."""
    http_host: str = "127.0.0.1"
    """The API's bind address; any but a loopback one requires http_token."""
    http_token: str = ""
    """A bearer token every endpoint but /health then requires (`Authorization: Bearer <token>`). Give it as
    AUTORESEARCH_LEDGER_HTTP_TOKEN rather than in a file others can read."""
    batch: int = 500
    """Events appended per transaction at most."""
    confirm_sigmas: float = 2.0
    """The keep gate: a run that beats bpb* by more than this many σ_noise becomes c* at once; a smaller
    win is kept only once a repeat with a fresh seed confirms it. 0: any strict improvement is kept."""

    def __post_init__(self) -> None:
        if not self.http_token and not is_loopback(self.http_host):
            raise ValueError(f"ledger.http_host {self.http_host!r} is not a loopback address, so the HTTP API needs "
                             "a token: set AUTORESEARCH_LEDGER_HTTP_TOKEN")


class Executor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    slots: int = 1
    """Concurrent runs; with GPUs, slot i runs on GPU i."""
    first_slot: int = 0
    """This executor's slots are first_slot, first_slot + 1, ...: executors sharing a machine need disjoint
    ranges (as root each slot runs as its own uid, and two executors on one slot take turns)."""
    budget_unit: str = "seconds"
    """seconds (the real loop), or steps / tokens for deterministic runs."""
    budget_amount: float = 0
    """0: the target's T_max."""
    seed: int = 0
    ack_wait_s: float = 30.0
    """A proposal whose executor went silent this long is redelivered. Keep it above a NATS node's failover
    (make faults: up to 12 s), or a run whose executor was reconnecting runs twice (the first finish counts)."""
    max_deliver: int = 3
    """Deliveries of one proposal at most; then the executors finish it as crashed, abandoned (no executor lived
    through it)."""
    progress_interval_s: float = 1.0
    """run.progress events per run at most this often (phase changes always go out)."""
    memory_mb: int = 0
    """Per run; 0: 60% of the memory available (physical, or the container's cgroup limit if lower) divided by
    the slots."""
    processes: int = 64
    file_size_mb: int = 2048
    open_files: int = 1024
    disk_mb: int = 8192
    """Per run: its workspace, log and the deleted files it holds open, polled every second."""
    files: int = 100_000
    """Per run: files and folders in its workspace."""


class Proposer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The search step's policy (services/proposer/policy.py, paper §4.1) and TERMINATE."""

    policy: Literal["random", "lm-score", "lm-generate", "openai-greedy"] = "lm-score"
    """random: grid moves of c*'s constants. lm-score: π_θ samples one edit of the catalogue, scored by its
    log-likelihood after the state prompt. lm-generate: π_θ writes the edit as JSON. openai-greedy: the paper's
    Greedy LLM baseline, an OpenAI-compatible chat endpoint at temperature 0, no learning."""
    seed: int = 0
    """Seeds the search step's draws: the k-th proposal's from (seed, k), so a restart repeats them."""
    model: str = ""
    """lm-*: a Hugging Face hub id or a local folder; "": the embedded default, an UNTRAINED small model built
    from this project's own text under data_dir/models/default (offline; it learns only from PPO)."""
    device: str = ""
    """lm-*: where the model runs ("cpu", "cuda", "cuda:1"); "": cuda if available, else cpu."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """lm-*: transformers + peft in the proposer's process (CPU or GPU), or vLLM (GPU only; the `gpu` extra),
    which serves every adapter version by name from one engine."""
    gpu_memory: float = 0.4
    """backend vllm: the fraction of the GPU's memory vLLM reserves (the learner trains on the same GPU)."""
    max_candidates: int = 8
    """lm-score: the catalogue actions π_θ chooses among per step, drawn at random (seeded) when the catalogue
    has more; 0: all. Each candidate is a forward pass over its text in every PPO epoch, hence the CPU-sized
    default (a 2-core update costs 0.62x what it costs with 16); on a GPU, 0."""
    token_limit: int = 4096
    """The state prompt's length at most, in the policy's tokens (lm-*) or estimated ones (openai-greedy):
    the oldest experiments are left out to fit (prompt.py). Keep it within the model's context. The default
    fits c*, program.md and a few experiments for the embedded model on a CPU; the paper uses 64,000."""
    temperature: float = 1.0
    """lm-generate: sampling temperature of π_θ (the learner recomputes the tokens' log-probs with it)."""
    max_new_tokens: int = 512
    """lm-generate, openai-greedy: tokens per answer at most."""
    max_resamples: int = 3
    """lm-generate, openai-greedy: new samples per step after an answer that is not an edit (each such answer
    is published with parse_error, so it costs −p_syntax)."""
    endpoint: str = ""
    """openai-greedy: the API's base URL, e.g. http://127.0.0.1:8000/v1 (POST {endpoint}/chat/completions)."""
    api_model: str = ""
    """openai-greedy: the model name sent to the endpoint; recorded as the proposals' policy_version."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai-greedy: the environment variable holding the API key (unset: no Authorization header)."""
    noise_repeats: int = 2
    """Repeats of the baseline with fresh seeds, right after it: they measure σ_noise for the keep gate."""
    target_bpb: float = 0
    """TERMINATE once bpb* <= this (0: off). With every condition off the loop runs forever."""
    max_experiments: int = 0
    max_hours: float = 0
    plateau: int = 0
    """Stop after this many finished experiments without a new best (0: off)."""


class Evaluator(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    alpha: float = 0.5
    """Tolerance of τ = bpb* + α·σ_h (eq. 7): a run is worth finishing while it may end at or below τ."""
    beta: float = 0.05
    """SPRT error rate: P(false abort of a run ending at or below τ) <= β/(1 − β) (eq. 8)."""
    delta_sigma_h: float = 1.0
    """The SPRT's alternative: the run ends this many σ_h above τ."""
    look_fraction: float = 0.1
    """A forecast and decision every this fraction of the budget (the paper's Δt = 30 s of T_max = 300 s)."""
    min_fraction: float = 0.3
    """No decision before this fraction of the budget."""
    warmup_runs: int = 10
    """Complete runs to calibrate on before any abort."""
    audit_fraction: float = 0.05
    """Runs never aborted (chosen by run id), so complete curves of every kind keep calibrating the forecast."""
    calibration_runs: int = 300
    """The most recent complete runs the forecast is calibrated on."""


class Learner(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The reward (services/learner/rewards.py) and PPO (services/learner/ppo.py). The paper gives no numbers
    for the reward constants: those defaults are ours, in val-bpb units (rewards are Δbpb-sized, ~0.01-0.5)."""

    lambda_eff: float = 0.01
    """Weight of the compute-efficiency bonus λ_eff·η, η = ln(throughput / c*'s throughput) clipped to [-1, 1]."""
    xi: float = 0.02
    """Novelty bonus ξ·d/(1 + d), d the edit distance to the closest tried diff per line of train.py (§6.3)."""
    p_syntax: float = 0.1
    """Penalty of an edit that does not apply or compile, or a model the frozen evaluation refuses."""
    p_waste: float = 0.05
    """Penalty of a run the self-evaluator aborted; also the most a finished run's regression costs."""
    p_crash: float = 0.1
    """Penalty of a run that crashed or hit the hard wall-clock kill."""
    clip: float = 0.2
    """PPO's ε (eq. 2; paper)."""
    gamma: float = 0.9
    """Discount per experiment (eq. 3; ours: an edit's effect on later experiments fades within a batch or so)."""
    gae_lambda: float = 0.95
    """GAE's λ (eq. 3; paper)."""
    c1: float = 0.5
    """Value-loss weight (eq. 4; paper)."""
    c2: float = 0.01
    """Entropy-bonus weight (eq. 4; paper)."""
    warmup_updates: int = 50
    """The learning rate rises linearly to its value over this many updates (paper)."""
    learning_rate: float = 5e-5
    """Adam's learning rate after warm-up (ours: usual for LoRA)."""
    lora_r: int = 32
    """LoRA rank on the attention projections (paper)."""
    lora_alpha: int = 64
    """LoRA α (paper)."""
    batch_size: int = 8
    """Finished search experiments per PPO update (ours: on 2 CPU cores, beside the runs, an update of the
    defaults took 4-6 experiments' time, so the learner keeps up; raise it and epochs on a GPU)."""
    minibatch_size: int = 4
    """Experiments per gradient step (ours)."""
    epochs: int = 2
    """Passes over each batch (ours; CleanRL's 4 cost twice as much on a CPU)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip (ours, as CleanRL)."""
    seed: int = 0
    """Seeds the minibatch shuffling."""


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    stack: Stack = Stack()
    nats: Nats = Nats()
    ledger: Ledger = Ledger()
    executor: Executor = Executor()
    proposer: Proposer = Proposer()
    evaluator: Evaluator = Evaluator()
    learner: Learner = Learner()

    @property
    def data_dir(self) -> Path:
        return Path(self.stack.data_dir).resolve()

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.duckdb"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    environ = dict(os.environ) if environ is None else environ
    file = Path(path or environ.get(f"{ENV_PREFIX}CONFIG", DEFAULT_FILE))
    raw: dict[str, dict[str, object]] = {}
    if file.is_file():
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{file}: {error}") from None
    for section, key, value in _overrides(environ):
        raw.setdefault(section, {})[key] = value
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as error:
        raise ConfigError(f"configuration ({file} and {ENV_PREFIX}* variables): {error}") from None


def _overrides(environ: dict[str, str]) -> list[tuple[str, str, str]]:
    """AUTORESEARCH_<SECTION>_<KEY> variables; section names have no underscore, keys may. A name that is neither
    a setting nor one of NOT_SETTINGS is refused: a misspelt section would otherwise change nothing, silently."""
    sections = set(Config.__struct_fields__)
    found = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name[len(ENV_PREFIX):] in NOT_SETTINGS:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in sections or not key:
            raise ConfigError(f"{name} names no setting (AUTORESEARCH_<SECTION>_<KEY>, sections: "
                              f"{', '.join(sorted(sections))})")
        found.append((section, key, value))
    return found
