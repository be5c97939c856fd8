"""Combine the per-rank summaries of a run into the job's figures.

Example::

    >>> from adaptive_lsgd.summary import combine_summaries
    >>> ranks = [{"rank": 0, "steps": 10, "syncs_per_level": [2], "periods": [4], "compute_s": 1.0,
    ...           "comm_s": 0.25, "mini_batch_s": 0.0, "mini_batch_steps": 0, "switch_step": 0},
    ...          {"rank": 1, "steps": 10, "syncs_per_level": [2], "periods": [4], "compute_s": 1.0,
    ...           "comm_s": 0.25, "mini_batch_s": 0.0, "mini_batch_steps": 0, "switch_step": 0}]
    >>> s = combine_summaries(ranks)
    >>> s["steps"], s["syncs_per_level"], s["comm_fraction"]
    (20, [2], 0.2)
"""

from __future__ import annotations


def combine_summaries(per_rank: list) -> dict:
    """Totals over ranks; the communication share is comm / (compute + comm) summed over ranks;
    ``local_steps_per_s`` and ``mini_batch_steps_per_s`` are per rank, summed over ranks."""
    compute = sum(r["compute_s"] for r in per_rank)
    comm = sum(r["comm_s"] for r in per_rank)
    local_steps = sum(r["steps"] - r["mini_batch_steps"] for r in per_rank)
    mb_steps = sum(r["mini_batch_steps"] for r in per_rank)
    mb_time = sum(r["mini_batch_s"] for r in per_rank)
    n = len(per_rank)
    return {
        "ranks": n,
        "steps": sum(r["steps"] for r in per_rank),
        "switch_step": per_rank[0]["switch_step"],
        "syncs_per_level": per_rank[0]["syncs_per_level"],
        "periods": per_rank[0]["periods"],
        "compute_s": compute,
        "comm_s": comm,
        "comm_fraction": comm / (compute + comm) if compute + comm > 0 else 0.0,
        "local_steps_per_s": n * local_steps / (compute + comm) if compute + comm > 0 else None,
        "mini_batch_steps_per_s": n * mb_steps / mb_time if mb_time > 0 else None,
        "model": per_rank[0].get("model"),
        "mechanisms": per_rank[0].get("mechanisms"),
        "rank_steps": per_rank[0].get("rank_steps"),
    }
