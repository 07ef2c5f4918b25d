"""The scaling rows of `python -m bench --sweep`: groups of configurations that vary one setting."""

from __future__ import annotations

from bench.config import RETRIEVAL_STAGE, BenchConfig

# The scaling rows: (group, overrides of the base configuration for each row).
SWEEPS = {
    "candidates": [{"stage": RETRIEVAL_STAGE, "candidates": n} for n in (5, 10, 20, 40)],
    # Chunked compression: its memory follows the chunk size, not the number of candidates.
    "chunk": [
        {"stage": RETRIEVAL_STAGE, "candidates": n, "candidate_chunk_size": c} for n, c in ((20, 8), (40, 8), (40, 40))
    ],
    "micro_batch": [{"micro_batch_size": m} for m in (1, 2, 4)],
    "compress_rate": [{"compress_rate": r} for r in (4, 16, 32, 128)],
    "docs": [{"docs": d} for d in (1, 2, 4, 8)],
    "doc_length": [{"doc_max_length": length} for length in (128, 256, 512)],
    "checkpointing": [{"gradient_checkpointing": on} for on in (False, True)],
    # ZeRO-3 partitions the base over the ranks: per-rank memory against ZeRO-2 (with --processes 2 or more).
    "zero": [{"zero_stage": z} for z in (2, 3)],
}


def describe_sweeps() -> str:
    """One line per group, e.g. `candidates (stage2): candidates 5 / 10 / 20 / 40`."""
    parts = []
    for name, rows in SWEEPS.items():
        keys = [k for k in rows[0] if k != "stage"]
        stage = f" ({RETRIEVAL_STAGE})" if all(row.get("stage") == RETRIEVAL_STAGE for row in rows) else ""
        values = " / ".join(",".join(str(row[k]) for k in keys) for row in rows)
        parts.append(f"{name}{stage}: {','.join(keys)} {values}")
    return "; ".join(parts)


def sweep_configs(base: BenchConfig, groups: str) -> list[BenchConfig]:
    chosen = list(SWEEPS) if groups == "all" else [g.strip() for g in groups.split(",") if g.strip()]
    unknown = [g for g in chosen if g not in SWEEPS]
    if unknown:
        raise ValueError(
            f"--sweep={groups!r}: unknown group {unknown[0]!r}; expected 'all' or some of " + ", ".join(SWEEPS)
        )
    rows = []
    for group in chosen:
        for overrides in SWEEPS[group]:
            values = {**base.to_dict(), **overrides, "group": group}
            if group == "docs" and base.stage_spec.uses_query:
                # Documents per sample is the candidates rows' job here: the docs rows run the stage before.
                values["stage"] = base.stage_spec.previous
            cfg = BenchConfig.from_dict(values)
            cfg.label = " ".join(f"{k}={v}" for k, v in overrides.items() if k != "stage")
            rows.append(cfg)
    return rows
