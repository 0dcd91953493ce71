"""The sampler's account of every prompt it dispatched (a Redis hash), readable by anyone."""

from __future__ import annotations

from proto.keys import run_key

ACCOUNT_FIELDS = (
    "dispatched",
    "trained",
    "filtered_all_correct",
    "filtered_all_wrong",
    "dropped_stale",
    "batches",
    "prompts_since_batch",
)


def account_key(run_id: str) -> str:
    return run_key(run_id, "account")


def read_account(client, run_id: str) -> dict[str, int]:
    """Counters plus ``in_flight`` = dispatched - trained - filtered - stale."""
    raw = client.hgetall(account_key(run_id))
    acc = {f: 0 for f in ACCOUNT_FIELDS}
    acc.update({(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()})
    resolved = acc["trained"] + acc["filtered_all_correct"] + acc["filtered_all_wrong"]
    acc["in_flight"] = acc["dispatched"] - resolved - acc["dropped_stale"]
    return acc
