"""Python inference API (README: "Evaluation and inference"): `from clara import CLaRa`.

The calls, argument names and return types of the official CLaRa release work as in its README:

    model = CLaRa.from_pretrained("checkpoints/clara_stage1_2")            # native or official layout
    model = CLaRa.from_pretrained("apple/CLaRa-7B-Instruct", subfolder="compression-16")  # Hub id
    embeddings, mse = model.compress_documents(documents=["Vorlan is a kingdom. ..."])  # [D, n, H], MSE
    answers = model.generate_from_text(questions=["What is Vorlan?"], documents=[["Vorlan is ..."]],
                                       max_new_tokens=64)
    answers = model.generate_from_compressed_documents_and_questions(
        questions=["What is Vorlan?"], compressed_documents=embeddings)     # k = D / questions per question
    paraphrases = model.generate_from_paraphrase(questions=[""], documents=[["Vorlan is ..."]])
    answers, topk_indices = stage2_model.generate_from_questions(questions=questions, documents=candidates,
                                                                 max_new_tokens=64)   # indices: [B, k] tensor

Decoding is greedy. Prompts are never written here: every call builds normalised records (the
form `clara.data` produces) and runs them through the training Collator and
`ClaraModel.generate`, so inference sees exactly the prompts that training used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clara.data.records import normalise_answer_record, normalise_stage1
from clara.model.collate import Collator, encode_documents
from clara.model.load import choose_runtime, load_for_use
from clara.model.model import ClaraModel
from clara.model.stage_model import ensure_query_reasoner, infer_stage
from clara.parallel.distributed import default_device
from clara.stages import Stage, stage1, stage1_2, stage2


# -- records in the normalised form of clara.data ----------------------------------------------------
def answer_record(question: str, docs: Sequence[str], answer: str = "", pos_index: Sequence[int] | None = None) -> dict:
    """A stage1_2 / stage2 record, through the data's own normaliser."""
    raw = {"question": question, "answer": answer, "docs": list(docs)}
    if pos_index is not None:
        raw["pos_index"] = list(pos_index)
    return normalise_answer_record(raw)


def paraphrase_record(docs: Sequence[str], paraphrase: str = "") -> dict:
    """A stage1 paraphrase record, through the data's own normaliser."""
    return normalise_stage1({"data_type": "paraphrase", "answer": paraphrase, "docs": list(docs)})


def _as_list(items, name: str) -> list:
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise TypeError(f"{name}: expected a list, got {type(items).__name__}")
    return list(items)


def answer_records(questions: Sequence[str], documents: Sequence[Sequence[str]]) -> list[dict]:
    """One stage1_2 / stage2 record per question with its own documents."""
    questions, documents = _as_list(questions, "questions"), _as_list(documents, "documents")
    if len(questions) != len(documents):
        raise ValueError(f"{len(questions)} questions but {len(documents)} document lists")
    documents = [_as_list(d, f"documents[{i}]") for i, d in enumerate(documents)]
    if any(not docs for docs in documents):
        raise ValueError("every question needs at least one document")
    return [answer_record(q, d) for q, d in zip(questions, documents)]


class CLaRa:
    """A trained CLaRa model ready for inference; see the module docstring."""

    def __init__(
        self,
        model: ClaraModel,
        stage: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_len: int | None = None,
        seed: int = 42,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.stage = stage
        self.batch_size = batch_size
        self.max_len = max_len
        self.seed = seed  # picks the paraphrase instruction, as in training (--seed, default 42)
        self._index = None  # the corpus index last answered from, kept loaded

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        stage: str | None = None,
        attn_implementation: str | None = None,
        base_model: str | None = None,
        subfolder: str | None = None,
        flash_attn: str = "auto",
        **kwargs,
    ) -> "CLaRa":
        """Load a checkpoint in the native or the official release layout: a directory or a Hub id.

        Hub ids: from_pretrained("apple/CLaRa-7B-Instruct", subfolder="compression-16") or the path form
        "apple/CLaRa-7B-Instruct/compression-16"; only that subfolder is downloaded
        (clara.model.hub.resolve_checkpoint).
        The loading is clara.model.load.load_for_use.

        device None: CUDA when available, else CPU. dtype None: bfloat16 on CUDA, float32 on CPU.
        attn_implementation None: as `flash_attn` says (auto: FlashAttention-2 on CUDA when installed, else SDPA;
        true; false), the command lines' --flash_attn.
        base_model replaces the base model the checkpoint names (e.g. a local copy).
        """
        runtime = choose_runtime(device, dtype, flash_attn, attn_implementation)
        model, path = load_for_use(path, runtime, base_model, subfolder)
        return cls(model, stage=stage or infer_stage(path), device=runtime.device, **kwargs)

    def to(self, device: str | torch.device) -> "CLaRa":
        """Move the model to another device (as `model.to("cuda")` in the official README); returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # -- helpers -----------------------------------------------------------------------------------------
    def _collator(self, stage: Stage) -> Collator:
        settings = self.model.settings
        return Collator(
            stage,
            self.model.tokenizer,
            self.model.tokens,
            settings.doc_max_length,
            self.max_len or stage.max_len,
            settings.generation_top_k,
            self.seed,
            with_targets=False,
        )

    def _generate(
        self, stage: Stage, records: list[dict], max_new_tokens: int, vectors: list[torch.Tensor] | None = None
    ) -> tuple[list[str], list]:
        """Greedy answers and (stage 2) chosen indices, in record order.

        vectors: per record, the memory vectors [docs, n, H] of its documents, computed earlier; they
        are used instead of compressing the records' documents.
        """
        collator = self._collator(stage)
        texts, chosen = [], []
        for start in range(0, len(records), self.batch_size):
            run = records[start : start + self.batch_size]
            batch = collator(run).to(self.device)
            given = None
            if vectors is not None:
                given = torch.cat(vectors[start : start + len(run)]).flatten(0, 1).to(self.device)
            out, picked = self.model.generate(batch, max_new_tokens=max_new_tokens, vectors=given)
            texts += out
            chosen += picked.tolist() if picked is not None else [None] * len(run)
        return texts, chosen

    # -- the API (official names, argument names and return types) ------------------------------------------
    @torch.no_grad()
    def compress_documents(self, documents: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Documents -> (embeddings, mse).

        embeddings: the memory vectors [D, n, H] (compressor final hidden states at the memory tokens),
        on the model's device. mse: the stage-1 alignment loss over these documents, a 0-dim float32
        tensor: the squared difference between the mean of a document's memory states and the mean of
        its token states, averaged over documents and hidden units.
        """
        documents = _as_list(documents, "documents")
        if not documents:
            raise ValueError("documents: expected at least one document, got an empty list")
        parts, weighted_mse = [], 0.0
        for start in range(0, len(documents), self.batch_size):
            chunk = documents[start : start + self.batch_size]
            ids, mask, _ = encode_documents(
                self.model.tokenizer, self.model.tokens, chunk, self.model.settings.doc_max_length
            )
            states, mse = self.model.compress(ids.to(self.device), mask.to(self.device), with_mse=True)
            parts.append(states)
            # Each chunk's MSE is a mean over its documents: weighting by their count gives the mean over all.
            weighted_mse = weighted_mse + mse * len(chunk)
        return torch.cat(parts), weighted_mse / len(documents)

    def generate_from_text(
        self, questions: Sequence[str], documents: Sequence[Sequence[str]], max_new_tokens: int = 128
    ) -> list[str]:
        """Answer each question from its own documents (all of them compressed), as in stage 1_2."""
        records = answer_records(questions, documents)
        return self._generate(stage1_2.STAGE, records, max_new_tokens)[0]

    def generate_from_compressed_documents_and_questions(
        self, questions: Sequence[str], compressed_documents: torch.Tensor, max_new_tokens: int = 128
    ) -> list[str]:
        """Answer each question from document vectors computed earlier by compress_documents, as in stage 1_2.

        compressed_documents [B * k, n, H] holds k documents per question, question by question.
        """
        questions = _as_list(questions, "questions")
        if not questions:
            raise ValueError("questions: expected at least one question, got an empty list")
        if not isinstance(compressed_documents, torch.Tensor):
            raise TypeError(
                f"compressed_documents: expected a tensor (the embeddings of `embeddings, mse = "
                f"compress_documents(...)`), got {type(compressed_documents).__name__}"
            )
        n, hidden = self.model.tokens.n_mem, self.model.hidden_size
        shape = tuple(compressed_documents.shape)
        if len(shape) != 3 or shape[1:] != (n, hidden) or shape[0] == 0 or shape[0] % len(questions):
            raise ValueError(
                f"compressed_documents: expected a tensor [k * {len(questions)} questions, {n}, {hidden}] "
                f"(the embeddings compress_documents returns), got shape {list(shape)}"
            )
        k = shape[0] // len(questions)
        # The documents are compressed already: the prompt needs only how many there are.
        records = [answer_record(q, [""] * k) for q in questions]
        vectors = list(compressed_documents.split(k))
        return self._generate(stage1_2.STAGE, records, max_new_tokens, vectors=vectors)[0]

    def generate_from_questions(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]] | None = None,
        max_new_tokens: int = 128,
        index: str | None = None,
        stage2_mips: bool = False,
    ) -> tuple[list[str], torch.Tensor | list[list[str]]]:
        """Stage 2: the query reasoner picks the top-k of each question's candidates, the generator answers.

        Returns the answers and topk_indices: per question, the chosen candidate indices in rank order,
        a [B, k] int64 tensor on the CPU (k = the checkpoint's generation_top_k). With index=DIR (a folder
        of `python -m clara.index`; stage2_mips=True, the official flag, asks for the same) the candidates
        are the whole indexed corpus, the generator reads the stored vectors, and the chosen documents are
        returned as ids (a list of lists of strings).
        """
        if index is not None or stage2_mips:
            if index is None or documents is not None:
                raise ValueError("answering from a corpus index (stage2_mips) takes index=DIR and no documents")
            return self._generate_from_index(_as_list(questions, "questions"), index, max_new_tokens)
        k = self.model.settings.generation_top_k
        records = answer_records(questions, documents)
        short = [i for i, r in enumerate(records) if len(r["docs"]) < k]
        if short:
            raise ValueError(
                f"questions {short[:10]} have fewer candidate documents than the checkpoint's generation_top_k={k}"
            )
        ensure_query_reasoner(self.model)
        answers, chosen = self._generate(stage2.STAGE, records, max_new_tokens)
        return answers, torch.tensor(chosen, dtype=torch.long).reshape(len(records), k)

    def _generate_from_index(self, questions: list[str], path: str, max_new_tokens: int) -> tuple[list, list]:
        # Deferred: faiss is needed only by this path.
        from clara.index.answer import answer_from_index
        from clara.index.store import check_index_matches, load_index

        if self._index is None or self._index.path != path:
            self._index = load_index(path)
        ensure_query_reasoner(self.model)
        check_index_matches(self._index, self.model)
        found = answer_from_index(
            self.model,
            self._index,
            questions,
            batch_size=self.batch_size,
            max_new_tokens=max_new_tokens,
            max_len=self.max_len or stage2.STAGE.max_len,
            seed=self.seed,
            device=self.device,
        )
        return found.answers, found.ids

    def generate_from_paraphrase(
        self, questions: Sequence[str], documents: Sequence[Sequence[str] | str], max_new_tokens: int = 128
    ) -> list[str]:
        """Paraphrase each item of documents (a list of documents read together, or one document), as in stage 1.

        questions: one per item, as in the official API; the paraphrase prompt has no question, so their
        text is not used (the official README passes empty strings).
        """
        questions, documents = _as_list(questions, "questions"), _as_list(documents, "documents")
        if len(questions) != len(documents):
            raise ValueError(f"{len(questions)} questions but {len(documents)} document lists")
        documents = [[d] if isinstance(d, str) else _as_list(d, f"documents[{i}]") for i, d in enumerate(documents)]
        if any(not docs for docs in documents):
            raise ValueError("every item needs at least one document")
        records = [paraphrase_record(docs) for docs in documents]
        return self._generate(stage1.STAGE, records, max_new_tokens)[0]
