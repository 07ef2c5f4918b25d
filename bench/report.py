"""The results table of `python -m bench` and the one-line description of the measured model."""

from __future__ import annotations

from bench.config import BenchConfig


def retrieves(result: dict) -> bool:
    """Whether the result's stage selects its documents with the query reasoner."""
    return BenchConfig.from_dict(result["config"]).stage_spec.uses_query


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


COLUMNS = (  # header, width, how to read it from a result
    ("group", 13, lambda r: r["group"]),
    ("stage", 8, lambda r: r["stage"]),
    ("mb", 3, lambda r: str(r["config"]["micro_batch_size"])),
    ("docs", 4, lambda r: str(BenchConfig.from_dict(r["config"]).docs_per_sample)),
    ("doc_len", 7, lambda r: str(r["config"]["doc_max_length"])),
    ("rate", 4, lambda r: str(r["config"]["compress_rate"])),
    ("mem", 3, lambda r: str(r["config"]["doc_max_length"] // r["config"]["compress_rate"])),
    ("chunk", 5, lambda r: str(r["config"]["candidate_chunk_size"]) if retrieves(r) else "-"),
    ("gc", 3, lambda r: "on" if r.get("gradient_checkpointing") else "off"),
    ("zero", 4, lambda r: str(r["config"].get("zero_stage", 2))),
    ("ranks", 5, lambda r: str(r["config"].get("processes", 1))),
    ("step s", 7, lambda r: _fmt(r.get("step_time_s"), ".3f")),
    ("samples/s", 9, lambda r: _fmt(r.get("samples_per_s"), ".2f")),
    ("tokens/s", 8, lambda r: _fmt(r.get("tokens_per_s"), ".0f")),
    ("peak MB", 8, lambda r: _fmt(r.get("peak_memory_mb"), ".0f")),
    ("step MB", 7, lambda r: _fmt(r.get("step_memory_mb"), ".0f")),
    ("compr MB", 8, lambda r: _fmt(r.get("candidate_compression_memory_mb"), ".0f")),
    ("TFLOP/s", 7, lambda r: _fmt(r.get("achieved_tflops"), ".3f")),
    ("MFU", 6, lambda r: _fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") is not None else "-"),
)


def format_table(results: list[dict]) -> str:
    lines = [" ".join(f"{h:>{w}}" if i > 1 else f"{h:<{w}}" for i, (h, w, _) in enumerate(COLUMNS))]
    lines.append("-" * len(lines[0]))
    for result in results:
        if "error" in result:
            cells = [
                f"{result['group']:<13}",
                f"{result['stage']:<8}",
                f"FAILED ({result['label'] or 'default'}): {result['error']}",
            ]
            lines.append(" ".join(cells))
            continue
        lines.append(
            " ".join(f"{get(result):>{w}}" if i > 1 else f"{get(result):<{w}}" for i, (_, w, get) in enumerate(COLUMNS))
        )
    return "\n".join(lines)


def describe(cfg: BenchConfig) -> str:
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    return (
        f"model: Qwen3 random weights, hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
        f"({cfg.num_kv_heads} kv, head_dim {head_dim}), intermediate {cfg.intermediate_size}, vocab "
        f"{cfg.vocab_size}{', tied embeddings' if cfg.tie_word_embeddings else ''}; LoRA r {cfg.lora_r}; "
        f"{cfg.warmup_steps} warm-up + {cfg.steps} timed steps"
    )
