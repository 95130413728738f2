"""The learner's question, `ledger.transitions`: the PPO transitions not learned from yet, each with the
context its reward is measured against, and the adapter versions published so far.

A transition is a finished *search* experiment whose proposal carries a language-model action: the prompt
s_t, log π(a_t|s_t), and either the candidates and the chosen index (score mode) or the tokens the
model wrote (generate mode). Noise and confirmation repeats are measurements the keep gate asks for, not
actions of the policy; random search logs no prompt. A transition is pending until a policy.updated names it.

Pending transitions come in the order they finished. That order only ever grows at its end, and every field
of a transition is fixed once it has finished (its context is the ledger as it stood then), so "the first N
pending" is the same batch whenever it is asked for: a learner that restarts mid-update gets it again.
"""

from __future__ import annotations

import duckdb
import msgspec

from services.ledger.projections import DEFAULT_RECENT, DEFAULT_TOP
from shared.diffs import EMPTY_SHA256, split_lines
from shared.queries import PublishedPolicy, Transition, TransitionsReply, TransitionsRequest

MAX_REPLY_BYTES = 512 * 1024
"""Transitions per reply stop short of this (NATS refuses messages over 1 MiB by default): the learner pages."""

LM_ACTION = """p.purpose = 'search' AND p.prompt IS NOT NULL AND p.logprob IS NOT NULL
    AND (p.candidates IS NOT NULL AND p.action_index IS NOT NULL OR p.completion_token_ids IS NOT NULL)"""
"""A proposal that is an action of a language-model policy, whose log π the learner can recompute."""

TRANSITIONS = f"""
WITH actions AS (
    SELECT p.proposal_id, p.prompt, p.candidates, p.action_index, p.completion_token_ids, p.parse_error
    FROM proposals p WHERE {LM_ACTION}
), finished AS (  -- bpb* before each run finished: the verdict of the run finished just before it
    SELECT proposal_id, lag(bpb_star) OVER (ORDER BY finished_seq) AS bpb_before
    FROM experiments WHERE finished_seq IS NOT NULL
), transitions AS (
    SELECT e.proposal_id, e.proposal_seq, e.finished_seq, e.policy, e.policy_version, a.prompt, a.candidates,
           a.action_index, a.completion_token_ids, a.parse_error, e.logprob,
           e.unified_diff, e.status, e.val_bpb, coalesce(e.tokens, 0) AS tokens,
           coalesce(e.training_s, 0.0) AS training_s, f.bpb_before AS bpb_star, e.parent_code_sha256
    FROM actions a JOIN experiments e USING (proposal_id) JOIN finished f USING (proposal_id)
)"""
"""Every finished experiment that is a transition, learned from or not."""
PENDING = f"""{TRANSITIONS}, consumed AS (
    SELECT DISTINCT unnest(from_json(proposals, '["VARCHAR"]')) AS proposal_id FROM policy_updates
), pending AS (SELECT * FROM transitions WHERE proposal_id NOT IN (FROM consumed))"""
COUNT_SQL = f"{PENDING} SELECT count(*) FROM pending"
PAGE_SQL = f"{PENDING} SELECT * FROM pending WHERE finished_seq > $1 ORDER BY finished_seq LIMIT $2"
ONE_SQL = f"{TRANSITIONS} SELECT * FROM transitions WHERE proposal_id = $1"
LM_PROPOSALS_SQL = f"SELECT count(*) FROM proposals p WHERE {LM_ACTION}"
POLICIES_SQL = "SELECT policy_version, adapter_name, adapter_sha256, update_index FROM policy_updates ORDER BY seq"

HISTORY_SQL = f"""
WITH before AS (SELECT * FROM experiments WHERE finished_seq < $1),
recent AS (SELECT proposal_id FROM before ORDER BY finished_seq DESC LIMIT {DEFAULT_RECENT}),
top AS (SELECT proposal_id FROM before WHERE status = 'ok' AND val_bpb IS NOT NULL
        ORDER BY val_bpb, finished_seq LIMIT {DEFAULT_TOP})
SELECT unified_diff FROM before
WHERE proposal_id IN (SELECT proposal_id FROM recent UNION SELECT proposal_id FROM top)
ORDER BY finished_seq"""
"""The history buffer h (projections.history_sql) as it stood just before stream sequence $1."""

THROUGHPUT_SQL = """
WITH c_star AS (SELECT code_sha256 FROM champions WHERE finished_seq < $1 ORDER BY finished_seq DESC LIMIT 1)
SELECT sum(tokens) / sum(training_s) FROM experiments
WHERE finished_seq < $1 AND status = 'ok' AND training_s > 0 AND code_sha256 = (FROM c_star)"""
"""Training tokens per second of c*'s ok runs, c* and its runs as they were just before stream sequence $1."""


def read_transitions(con: duckdb.DuckDBPyConnection, request: TransitionsRequest) -> TransitionsReply:
    """One page of pending transitions, with the counts and the published versions (`con`: one snapshot)."""
    rows = con.execute(PAGE_SQL, [request.after_finished_seq, request.limit])
    names = [column[0] for column in rows.description]
    page, size = [], 0
    for row in rows.fetchall():
        transition = _transition(con, dict(zip(names, row, strict=True)))
        size += len(msgspec.json.encode(transition))
        if page and size > MAX_REPLY_BYTES:
            break
        page.append(transition)
    return TransitionsReply(
        pending=con.execute(COUNT_SQL).fetchone()[0],
        lm_proposals=con.execute(LM_PROPOSALS_SQL).fetchone()[0],
        transitions=page,
        policies=[PublishedPolicy(policy_version=version, adapter_name=name, adapter_sha256=sha, update_index=index)
                  for version, name, sha, index in con.execute(POLICIES_SQL).fetchall()])


def read_transition(con: duckdb.DuckDBPyConnection, proposal_id: str) -> Transition | None:
    """The transition an experiment was (or will be) for the learner: None if it is not one, or not finished."""
    rows = con.execute(ONE_SQL, [proposal_id])
    names = [column[0] for column in rows.description]
    found = rows.fetchone()
    return None if found is None else _transition(con, dict(zip(names, found, strict=True)))


def _transition(con: duckdb.DuckDBPyConnection, row: dict) -> Transition:
    """A page row with the context of its reward: h, c*'s throughput and the length of the edited file."""
    parent = row.pop("parent_code_sha256")
    row["candidates"] = _json(row["candidates"], list[str])
    row["completion_token_ids"] = _json(row["completion_token_ids"], list[int])
    seq = row["finished_seq"]
    return Transition(**row, throughput=con.execute(THROUGHPUT_SQL, [seq]).fetchone()[0],
                      history=[diff for (diff,) in con.execute(HISTORY_SQL, [seq]).fetchall()],
                      file_lines=len(split_lines(_code(con, parent))))


def _json(value: str | None, kind: type) -> object:
    return None if value is None else msgspec.json.decode(value, type=kind)


def _code(con: duckdb.DuckDBPyConnection, sha256: str) -> str:
    if sha256 == EMPTY_SHA256:
        return ""
    found = con.execute("SELECT code FROM code_blobs WHERE sha256 = $1", [sha256]).fetchone()
    return found[0] if found else ""
