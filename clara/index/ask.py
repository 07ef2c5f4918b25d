"""python -m clara.ask --checkpoint CK --index DIR "question" ...: answer from a corpus index.

Prints each answer and the retrieved documents (rank, cosine score, id, first words); the
generator reads the stored vectors of the first generation_top_k of them.
"""

from __future__ import annotations

import argparse
import sys

from clara.cli import add_model_flags, positive_int
from clara.errors import exit_status
from clara.index.answer import answer_from_index
from clara.index.store import check_index_matches, load_index
from clara.model.load import choose_runtime, load_for_use
from clara.model.stage_model import ensure_query_reasoner

FIRST_WORDS = 12


def first_words(text: str, count: int = FIRST_WORDS) -> str:
    words = text.split()
    return " ".join(words[:count]) + (" ..." if len(words) > count else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.ask", description="Answer questions from a corpus index built by python -m clara.index."
    )
    parser.add_argument("questions", nargs="+", help="one or more questions")
    parser.add_argument(
        "--checkpoint", required=True, help="stage2 checkpoint (or stage1_2: its compressor as reasoner)"
    )
    parser.add_argument("--index", required=True, help="index folder of python -m clara.index")
    parser.add_argument("--max_new_tokens", type=positive_int, default=64, help="max generated tokens (default 64)")
    add_model_flags(parser)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(lambda: ask(args))


def ask(args: argparse.Namespace) -> None:
    runtime = choose_runtime(dtype=args.dtype, flash_attn=args.flash_attn)
    model, _ = load_for_use(args.checkpoint, runtime, base_model=args.model_path)
    index = load_index(args.index)
    ensure_query_reasoner(model)
    check_index_matches(index, model, args.checkpoint)
    found = answer_from_index(model, index, args.questions, max_new_tokens=args.max_new_tokens, device=runtime.device)
    for question, answer, rows, scores in zip(args.questions, found.answers, found.rows, found.scores):
        print(f"Q: {question}\nA: {answer}")
        for rank, (row, score) in enumerate(zip(rows, scores), start=1):
            print(f"  {rank}. [{score:.3f}] {index.ids[row]}: {first_words(index.text(row))}")


if __name__ == "__main__":
    sys.exit(main())
