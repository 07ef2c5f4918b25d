"""Evaluation of a model on normalised records (README: "Evaluation and inference"): what the trainer runs
during training and `python -m clara.evaluate` (clara.evaluate, its command line) runs on a checkpoint.

Every stage: eval loss (the mean of per-sample teacher-forced LM losses, in eval mode) and token
accuracy. stage1_2 and stage2 also answer the first `eval_max_samples` (`--max_samples`) samples
by greedy generation and score them with EM, F1 and cover-EM against the first gold answer, as
the paper does, and with their best over all gold answers (`*_any`; see clara.evaluation.metrics); stage2
also reports recall@k and precision@k against `pos_index`.

Several processes (torchrun, accelerate launch) split the work by micro-batches: the data is cut
into micro-batches in dataset order first and rank r takes micro-batches r, r + world, ..., so
each micro-batch holds the same samples whatever the world size. Rank 0 gathers the per-sample
results, restores dataset order and computes the summary, which every rank receives. On a model that
ZeRO-3 partitions (evaluation during a ZERO_STAGE=3 run) every forward is collective, so the ranks run
the same number of forwards and generations, on stand-in micro-batches where they have none of their own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clara.evaluation.metrics import ANSWER_SCORE_NAMES, answer_scores, retrieval_summary
from clara.model.collate import Collator
from clara.model.model import eval_mode
from clara.parallel.distributed import broadcast, gather_rows, in_lockstep
from clara.stages import Stage

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
    row = {
        "index": index,
        "question": question,
        "answer": answer,
        "loss": loss,
        "correct_tokens": hits,
        "answer_tokens": count,
        "token_accuracy": hits / count if count else None,
    }
    if "data_type" in record:
        row["data_type"] = record["data_type"]
    if stage.generates:
        row.update(answers=list(record["answers"]), prediction=None, **dict.fromkeys(ANSWER_SCORE_NAMES))
    if chosen is not None:
        row["chosen"] = chosen
        row["pos_index"] = list(record["pos_index"]) if record["has_pos_index"] else None
    return row


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation reads of the settings; memory and retrieval settings come from the model."""

    batch_size: int  # samples per forward, per process
    generate_limit: int  # the first this many samples are also answered by generation
    max_new_tokens: int  # per generated answer
    max_len: int  # decoder tokens
    seed: int  # the training seed, which picks the stage1 paraphrase prompts


def lockstep_rounds(num_batches: int, rank: int, world: int, lockstep: bool) -> list[int | None]:
    """The micro-batches this rank evaluates (rank r: r, r + world, ...), one per round.

    In lockstep (ZeRO-3: every forward is collective) every rank runs the same number of rounds; a
    rank without a micro-batch of its own in the last round gets None there and runs a stand-in.
    """
    mine = list(range(rank, num_batches, world))
    rounds = -(-num_batches // world) if lockstep else len(mine)
    return mine + [None] * (rounds - len(mine))


@torch.no_grad()
def evaluate_shard(
    model,
    records,
    stage: Stage,
    batch_size: int,
    generate_limit: int,
    max_new_tokens: int,
    max_len: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    device=None,
    show_progress: bool = True,
    leave_progress: bool = False,
) -> list[dict]:
    """This rank's per-sample results (each with its dataset index under "index")."""
    settings = model.settings
    device = device if device is not None else model.mem_embeddings.device
    collate = {
        targets: Collator(
            stage,
            model.tokenizer,
            model.tokens,
            settings.doc_max_length,
            max_len,
            settings.generation_top_k,
            seed,
            with_targets=targets,
        )
        for targets in (True, False)
    }
    batches = micro_batches(len(records), batch_size)
    lockstep = world > 1 and in_lockstep(model)
    rounds = lockstep_rounds(len(batches), rank, world, lockstep)
    progress = None
    if show_progress and rank == 0:
        progress = tqdm(
            total=sum(len(batches[b]) for b in rounds if b is not None),
            unit="sample",
            desc=f"eval {stage.name}" + (" (rank 0)" if world > 1 else ""),
            dynamic_ncols=True,
            file=sys.stderr,
            leave=leave_progress,
        )
    results = []
    for number, own in enumerate(rounds):
        indices = list(batches[own if own is not None else 0])
        run = [records[i] for i in indices]
        out = model(collate[True](run).to(device))  # every loss term at weight 0: the LM loss alone
        losses, hits, counts = per_sample_lm(out.lm, len(run))
        chosen = out.chosen.tolist() if out.chosen is not None else [None] * len(run)
        rows = [
            sample_row(stage, index, record, losses[j], hits[j], counts[j], chosen[j])
            for j, (index, record) in enumerate(zip(indices, run))
        ]
        wanted = [j for j, index in enumerate(indices) if index < generate_limit] if own is not None else []
        # In lockstep a round generates on every rank when one of its micro-batches asks for answers.
        this_round = batches[number * world : (number + 1) * world] if lockstep else [indices]
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
        summary.update(
            sorted(
                retrieval.items(), key=lambda kv: (not kv[0].startswith("recall@"), not kv[0].startswith("precision@"))
            )
        )
    return summary


def evaluate_stage(
    model,
    records,
    stage: Stage,
    settings: EvalSettings,
    rank: int = 0,
    world: int = 1,
    device=None,
    show_progress: bool = True,
    leave_progress: bool = False,
) -> dict:
    """Evaluate a ClaraModel on normalised records of `stage` (a datasets.Dataset or a list).

    Memory and retrieval settings come from the model. The model runs in eval mode and is put
    back in the mode it came in. Every rank must call this with the same records.
    Returns {"summary": flat dict of numbers (every rank), "samples": per-sample rows in dataset
    order (rank 0; None elsewhere)}.
    """
    with eval_mode(model):
        rows = evaluate_shard(
            model,
            records,
            stage,
            settings.batch_size,
            settings.generate_limit,
            settings.max_new_tokens,
            settings.max_len,
            settings.seed,
            rank,
            world,
            device,
            show_progress,
            leave_progress,
        )
    rows = gather_rows(rows, rank, world)
    summary = broadcast(summarise(stage, rows) if rank == 0 else None, rank, world)
    return {"summary": summary, "samples": rows}
