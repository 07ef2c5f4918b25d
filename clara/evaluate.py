"""Evaluation (README: "Evaluation and inference"): inside the trainer and as `python -m clara.evaluate`.

Every stage: eval loss (the mean of per-sample teacher-forced LM losses, in eval mode) and token
accuracy. stage1_2 and stage2 also answer the first `eval_max_samples` (`--max_samples`) samples
by greedy generation and score them with EM, F1 and cover-EM against the first gold answer, as
the paper does, and with their best over all gold answers (`*_any`; see clara.metrics); stage2
also reports recall@k and precision@k against `pos_index`.

Several processes (torchrun, accelerate launch) split the work by micro-batches: the data is cut
into micro-batches in dataset order first and rank r takes micro-batches r, r + world, ..., so
each micro-batch holds the same samples whatever the world size. Rank 0 gathers the per-sample
results, restores dataset order and computes the summary, which every rank receives. On a model that
ZeRO-3 partitions (evaluation during a ZERO_STAGE=3 run) every forward is collective, so the ranks run
the same number of forwards and generations, on stand-in micro-batches where they have none of their own.

    python -m clara.evaluate --checkpoint DIR --dataset FILE|hf:NAME:CONFIG[:SPLIT] [--stage S] [--max_samples N]
        [--batch_size B] [--max_new_tokens T] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import datasets
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clara.checkpoint import load_model, official_base_name, read_config, resolve_base_path, resolve_checkpoint
from clara.collate import Collator, LengthCheck
from clara.config import TrainConfig, check_data_sources
from clara.data import load_records
from clara.distributed import broadcast, gather_rows, in_lockstep, rank_zero_first, resolve_dtype, run_command
from clara.errors import CheckpointError, ConfigError
from clara.files import json_safe, write_json_atomic, write_text_atomic
from clara.inference import ensure_query_reasoner, infer_stage
from clara.metrics import ANSWER_SCORE_NAMES, answer_scores, retrieval_summary
from clara.model import attention_implementation, eval_mode
from clara.stages import STAGES, Stage, get_stage

RETRIEVAL_KS = (1, 3, 5)


# -- per-sample results -----------------------------------------------------------------------------------
def per_sample_lm(lm, batch_size: int) -> tuple[list[float | None], list[int], list[int]]:
    """Per-sample mean cross-entropy, correct answer tokens and answer tokens, from the supervised positions."""
    ce = F.cross_entropy(lm.logits.float(), lm.targets, reduction="none").double().cpu()
    index = lm.sample_index.cpu()
    correct = (lm.logits.argmax(-1) == lm.targets).cpu().double()
    sums = torch.zeros(batch_size, dtype=torch.float64).index_add_(0, index, ce)
    hits = torch.zeros(batch_size, dtype=torch.float64).index_add_(0, index, correct)
    counts = torch.bincount(index, minlength=batch_size)
    losses = [(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    return losses, [int(h) for h in hits.tolist()], counts.tolist()


def micro_batches(num_samples: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def sample_row(stage: Stage, index: int, record: dict, loss, hits: int, count: int, chosen) -> dict:
    """One sample's result before generation."""
    question, answer = stage.header(record)
    row = {"index": index, "question": question, "answer": answer, "loss": loss,
           "correct_tokens": hits, "answer_tokens": count, "token_accuracy": hits / count if count else None}
    if "data_type" in record:
        row["data_type"] = record["data_type"]
    if stage.generates:
        row.update(answers=list(record["answers"]), prediction=None, **dict.fromkeys(ANSWER_SCORE_NAMES))
    if chosen is not None:
        row["chosen"] = chosen
        row["pos_index"] = list(record["pos_index"]) if record["has_pos_index"] else None
    return row


def lockstep_rounds(num_batches: int, rank: int, world: int, lockstep: bool) -> list[int | None]:
    """The micro-batches this rank evaluates (rank r: r, r + world, ...), one per round.

    In lockstep (ZeRO-3: every forward is collective) every rank runs the same number of rounds; a
    rank without a micro-batch of its own in the last round gets None there and runs a stand-in.
    """
    mine = list(range(rank, num_batches, world))
    rounds = -(-num_batches // world) if lockstep else len(mine)
    return mine + [None] * (rounds - len(mine))


@torch.no_grad()
def evaluate_shard(model, records, stage: Stage, batch_size: int, generate_limit: int, max_new_tokens: int,
                   max_len: int, seed: int, rank: int = 0, world: int = 1, device=None,
                   show_progress: bool = True, leave_progress: bool = False) -> list[dict]:
    """This rank's per-sample results (each with its dataset index under "index")."""
    settings = model.settings
    device = device if device is not None else model.mem_embeddings.device
    collate = {targets: Collator(stage, model.tokenizer, model.tokens, settings.doc_max_length, max_len,
                                 settings.generation_top_k, seed, with_targets=targets)
               for targets in (True, False)}
    batches = micro_batches(len(records), batch_size)
    lockstep = world > 1 and in_lockstep(model)
    rounds = lockstep_rounds(len(batches), rank, world, lockstep)
    progress = None
    if show_progress and rank == 0:
        progress = tqdm(total=sum(len(batches[b]) for b in rounds if b is not None), unit="sample",
                        desc=f"eval {stage.name}" + (" (rank 0)" if world > 1 else ""), dynamic_ncols=True,
                        file=sys.stderr, leave=leave_progress)
    results = []
    for number, own in enumerate(rounds):
        indices = list(batches[own if own is not None else 0])
        run = [records[i] for i in indices]
        out = model(collate[True](run).to(device), mse_weight=0.0)
        losses, hits, counts = per_sample_lm(out.lm, len(run))
        chosen = out.chosen.tolist() if out.chosen is not None else [None] * len(run)
        rows = [sample_row(stage, index, record, losses[j], hits[j], counts[j], chosen[j])
                for j, (index, record) in enumerate(zip(indices, run))]
        wanted = [j for j, index in enumerate(indices) if index < generate_limit] if own is not None else []
        # In lockstep a round generates on every rank when one of its micro-batches asks for answers.
        this_round = batches[number * world:(number + 1) * world] if lockstep else [indices]
        if stage.generates and any(b[0] < generate_limit for b in this_round):
            prompt = collate[False]([run[j] for j in wanted or [0]]).to(device)
            texts, _ = model.generate(prompt, max_new_tokens=max_new_tokens)
            for j, text in zip(wanted, texts):
                rows[j].update(prediction=text, **answer_scores(text, rows[j]["answers"]))
        if own is not None:
            results += rows
            if progress is not None:
                progress.update(len(indices))
    if progress is not None:
        progress.close()
    return results


def summarise(stage: Stage, rows: list[dict]) -> dict:
    """The flat summary of numbers: what the trainer logs as eval_* and the CLI prints."""
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    tokens = sum(r["answer_tokens"] for r in rows)
    summary: dict = {
        "loss": sum(losses) / len(losses) if losses else float("nan"),
        "token_accuracy": sum(r["correct_tokens"] for r in rows) / tokens if tokens else float("nan"),
        "samples": len(rows),
    }
    if stage.generates:
        generated = [r for r in rows if r["prediction"] is not None]
        for key in ANSWER_SCORE_NAMES:
            summary[key] = sum(r[key] for r in generated) / len(generated) if generated else float("nan")
        summary["generated"] = len(generated)
    if stage.uses_query:
        retrieval = retrieval_summary([r["chosen"] for r in rows], [r["pos_index"] for r in rows], RETRIEVAL_KS)
        # Recall first, then precision, then the counts: the order the table shows.
        summary.update(sorted(retrieval.items(), key=lambda kv: (not kv[0].startswith("recall@"),
                                                                 not kv[0].startswith("precision@"))))
    return summary


def evaluate_model(model, records, cfg, rank: int = 0, world: int = 1, device=None,
                   show_progress: bool = True, leave_progress: bool = False) -> dict:
    """Evaluate a ClaraModel on normalised records (a datasets.Dataset or a list).

    cfg needs stage, micro_batch_size, eval_max_samples, max_new_tokens, max_len and seed (a
    TrainConfig does). Memory and retrieval settings come from the model. The model runs in eval
    mode and is put back in the mode it came in. Every rank must call this with the same records.
    Returns {"summary": flat dict of numbers (every rank), "samples": per-sample rows in dataset
    order (rank 0; None elsewhere)}.
    """
    with eval_mode(model):
        rows = evaluate_shard(model, records, get_stage(cfg.stage), cfg.micro_batch_size, cfg.eval_max_samples,
                              cfg.max_new_tokens, cfg.max_len, cfg.seed, rank, world, device,
                              show_progress, leave_progress)
    rows = gather_rows(rows, rank, world)
    summary = broadcast(summarise(get_stage(cfg.stage), rows) if rank == 0 else None, rank, world)
    return {"summary": summary, "samples": rows}


# -- presentation -----------------------------------------------------------------------------------------
PERCENT_KEYS = ("token_accuracy", *ANSWER_SCORE_NAMES)


def format_table(summary: dict, title: str = "") -> str:
    """A small two-column table; shares are shown as percentages."""
    lines = [title] if title else []
    width = max(len(k) for k in summary)
    lines.append(f"{'metric'.ljust(width)}  value")
    lines.append(f"{'-' * width}  {'-' * 10}")
    for key, value in summary.items():
        if isinstance(value, float) and math.isnan(value):
            shown = "n/a"
        elif key in PERCENT_KEYS or key.startswith(("recall@", "precision@")):
            shown = f"{100 * value:.2f}%"
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)


def summary_path(output: str) -> str:
    """out.jsonl -> out.summary.json (next to the per-sample file)."""
    root, ext = os.path.splitext(output)
    return (root if ext in (".jsonl", ".json") else output) + ".summary.json"


def write_outputs(output: str, rows: list[dict], summary: dict, meta: dict) -> str:
    """Per-sample JSON lines at `output`, the summary beside it; both replaced atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_text_atomic(output, "".join(json.dumps(json_safe(row), ensure_ascii=False) + "\n" for row in rows))
    path = summary_path(output)
    write_json_atomic(path, {**meta, "metrics": json_safe(summary)})
    return path


# -- command line -----------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.evaluate",
        description="Evaluate a CLaRa checkpoint on a JSONL file of its stage: eval loss and token accuracy; "
                    "stage1_2/stage2 also EM, F1 and cover-EM of greedy answers; stage2 also recall@k. "
                    "Runs on several processes under torchrun or accelerate launch.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (native or official release layout) or Hugging Face Hub id "
                             "(e.g. apple/CLaRa-7B-E2E/compression-16)")
    parser.add_argument("--dataset", required=True,
                        help="JSONL file(s) of the stage, joined by commas, or a Hub data set hf:NAME:CONFIG[:SPLIT] "
                             "(NAME: a Hub id or a local directory in the Hub layout)")
    parser.add_argument("--stage", choices=list(STAGES), default=None,
                        help="data format and metrics (default: the stage recorded in the checkpoint; official "
                             "checkpoints: stage2 when they hold a query_reasoner_adapter, else required)")
    parser.add_argument("--max_samples", type=positive_int, default=None,
                        help="answer only the first N samples by generation "
                             "(default: all; the eval loss covers every sample)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N samples of the dataset for everything")
    parser.add_argument("--batch_size", type=positive_int, default=4,
                        help="samples per forward, per process (default 4)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=64,
                        help="max generated tokens per answer (default 64)")
    parser.add_argument("--output", default=None,
                        help="write per-sample JSON lines here, and the summary to the same name with .summary.json "
                             "(out.jsonl -> out.summary.json); default: print the table only")
    parser.add_argument("--max_len", type=positive_int, default=None,
                        help="max decoder tokens (default 2048, stage2 1024, as in training)")
    parser.add_argument("--seed", type=int, default=42,
                        help="the training seed, which picks the stage1 paraphrase prompts (default 42)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (default): bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on the CPU; bf16; fp16; fp32")
    parser.add_argument("--flash_attn", default="auto", choices=("auto", "true", "false"),
                        help="auto (default): FlashAttention-2 when installed and on CUDA, else SDPA")
    parser.add_argument("--model_path", default=None,
                        help="base model to use instead of the one the checkpoint names")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--index", default=None,
                        help="stage2: also answer from this corpus index (python -m clara.index): recall@1/3/5 of "
                             "the records' gold_ids over the whole corpus, and EM / F1 / cover-EM (on rank 0)")
    return parser


def resolve_stage(checkpoint: str, stage: str | None) -> str:
    found = infer_stage(checkpoint)
    if stage:
        return stage
    if found is None:
        raise CheckpointError(f"{checkpoint}: the official release layout records no stage and it has no "
                              "query_reasoner_adapter (which would mean stage2); "
                              "pass --stage stage1 or --stage stage1_2")
    if found not in STAGES:
        raise CheckpointError(f"{checkpoint}/config.json: unknown stage {found!r}; pass --stage")
    return found


def resolve_runtime(dtype_name: str, flash_attn: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The weights' dtype and the attention implementation for --dtype and --flash_attn on this device."""
    return resolve_dtype(dtype_name, device), attention_implementation(flash_attn, device.type == "cuda")


def load_eval_records(stage: Stage, dataset: str, top_k: int, limit: int | None, check: LengthCheck | None, log):
    """Validated records of `dataset` (JSONL files or hf:NAME:CONFIG[:SPLIT]); the first `limit` when given.

    Local rank 0 prepares them (once: cached, with the MAX_LEN check); the node's other ranks wait for it."""
    datasets.disable_progress_bars()
    preparer = int(os.environ.get("LOCAL_RANK", "0")) == 0
    return load_records(stage, dataset, min_docs=stage.min_docs(top_k), max_samples=limit, make_check=check,
                        log=log if preparer else (lambda *_: None), preparer=preparer)


def eval_length_check(checkpoint: str, stage: Stage, max_len: int | None, seed: int,
                      model_path: str | None) -> LengthCheck:
    """The MAX_LEN check of the records with the checkpoint's tokenizer and memory-token settings."""
    config = read_config(checkpoint)
    if "decoder_model_name" in config:  # the official layout: the tokenizer is the base model's
        source = resolve_base_path(model_path or official_base_name(config["decoder_model_name"], checkpoint))
        doc_len = int(config["doc_max_length"])
        n_mem = doc_len // int(config["compr_rate"])
    else:
        source, doc_len, n_mem = checkpoint, int(config["doc_max_length"]), int(config["n_mem_tokens"])
    return LengthCheck(stage, source, n_mem, doc_len, max_len or stage.max_len, int(config.get("generation_top_k", 5)),
                       seed)


def load_eval_model(checkpoint: str, stage: Stage, dtype: torch.dtype, attn: str, model_path: str | None,
                    device: torch.device, log):
    """The checkpoint's ClaraModel on `device`, with a query reasoner where the stage uses one."""
    model = load_model(checkpoint, dtype, attn, base_model=model_path)
    if stage.uses_query:
        ensure_query_reasoner(model, log=log)
    return model.to(device)


def eval_config(model, stage: Stage, num_records: int, batch_size: int, max_samples: int | None,
                max_new_tokens: int, max_len: int | None, seed: int) -> TrainConfig:
    """The TrainConfig that evaluate_model needs; memory and retrieval settings come from the model."""
    return TrainConfig(stage=stage.name, micro_batch_size=batch_size, eval_max_samples=max_samples or num_records,
                       max_new_tokens=max_new_tokens, doc_max_length=model.settings.doc_max_length,
                       max_len=max_len or stage.max_len, generation_top_k=model.settings.generation_top_k,
                       seed=seed)


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    say = print if rank == 0 else (lambda *a, **k: None)
    # A Hub id is downloaded once, by rank 0; the other ranks then find it in the cache.
    checkpoint = rank_zero_first(lambda: resolve_checkpoint(args.checkpoint), rank, world)
    stage = get_stage(resolve_stage(checkpoint, args.stage))
    stage_source = "--stage" if args.stage else "from the checkpoint"
    if args.index and not stage.uses_query:
        raise ConfigError("index", args.index, f"a stage2 checkpoint and records (open-corpus retrieval uses the "
                                               f"query reasoner), not {stage.name}")
    check_data_sources("dataset", args.dataset)
    dtype, attn = resolve_runtime(args.dtype, args.flash_attn, device)
    top_k = int(read_config(checkpoint).get("generation_top_k", 5))
    check = eval_length_check(checkpoint, stage, args.max_len, args.seed, args.model_path)
    records = load_eval_records(stage, args.dataset, top_k, args.limit, check, say)
    model = load_eval_model(checkpoint, stage, dtype, attn, args.model_path, device, say)
    cfg = eval_config(model, stage, len(records), args.batch_size, args.max_samples, args.max_new_tokens,
                      args.max_len, args.seed)
    say(f"Evaluating {args.checkpoint} ({stage.name}, {stage_source}) on {args.dataset}: {len(records)} samples"
        + (f", generation on {min(cfg.eval_max_samples, len(records))}" if stage.generates else "")
        + f" | {world} process(es) | device {device.type} | dtype {str(dtype).replace('torch.', '')}",
        flush=True)
    results = evaluate_model(model, records, cfg, rank, world, device, show_progress=not args.no_progress,
                             leave_progress=True)
    if rank == 0:
        say(format_table(results["summary"], title=f"{stage.name} evaluation of {args.checkpoint}"))
        if args.index:
            results["summary"].update(open_corpus(args, model, records, cfg, device, say))
        if args.output:
            meta = {"checkpoint": args.checkpoint, "dataset": args.dataset, "stage": stage.name, "world_size": world,
                    "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "index": args.index}
            written = write_outputs(args.output, results["samples"], results["summary"], meta)
            say(f"Per-sample results: {args.output}\nSummary: {written}")
    return results


def open_corpus(args: argparse.Namespace, model, records, cfg, device: torch.device, say) -> dict:
    """The open-corpus table (answers from the index's stored vectors); its numbers prefixed open_."""
    from clara.index import check_index_matches, load_index, open_corpus_summary

    index = load_index(args.index)
    check_index_matches(index, model, args.checkpoint)
    gold = [list(r["gold_ids"]) if r["has_gold_ids"] else None for r in records]
    summary, _ = open_corpus_summary(model, index, [r["question"] for r in records], [r["answer"] for r in records],
                                     gold, min(cfg.eval_max_samples, len(records)), RETRIEVAL_KS,
                                     batch_size=cfg.micro_batch_size, max_new_tokens=cfg.max_new_tokens,
                                     max_len=cfg.max_len, seed=cfg.seed, device=device)
    say(format_table(summary, title=f"open-corpus evaluation: retrieval over all {len(index.ids)} documents of "
                                    f"{args.index}, answers from their stored vectors"))
    return {f"open_{key}": value for key, value in summary.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda rank, world, device: run(args, rank, world, device))


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
