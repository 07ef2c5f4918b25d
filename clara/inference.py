"""Python inference API (spec section 7): `from clara import CLaRa`.

    model = CLaRa.from_pretrained("checkpoints/clara_stage1_2")           # native or official layout
    vectors = model.compress_documents(["Vorlan is a kingdom. ..."])       # [D, n, H]
    answers = model.generate_from_text(["What is Vorlan?"], [["Vorlan is a kingdom. ..."]])
    answers, chosen = stage2_model.generate_from_questions(questions, candidates)
    paraphrases = model.generate_from_paraphrase(["Vorlan is a kingdom. ..."])

Decoding is greedy. Prompts are never written here: every call builds normalised records (the
form `clara.data` produces) and runs them through the training Collator and
`ClaraModel.generate`, so inference sees exactly the prompts that training used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from clara.checkpoint import CheckpointError, load_model, read_config
from clara.collate import Collator, encode_documents
from clara.model import ClaraModel

QUERY_REASONER = "query_reasoner_adapter"
DEFAULT_MAX_LEN = {"stage1": 2048, "stage1_2": 2048, "stage2": 1024}


# -- devices and dtypes ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None: the current CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on CUDA, float32 elsewhere (as in training)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto or one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


# -- checkpoints ------------------------------------------------------------------------------------------
def official_adapter_names(path: str) -> list[str]:
    """Adapter names of an official-layout checkpoint, read without loading the whole file where possible."""
    file = os.path.join(path, "adapters.pth")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: official-layout checkpoint without adapters.pth")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    return list(state)


def infer_stage(path: str) -> str | None:
    """The stage of a checkpoint: recorded in native checkpoints.

    The official release layout records none. There, a query_reasoner_adapter means stage2;
    without one, stage1 and stage1_2 checkpoints look alike and None is returned (the caller asks).
    """
    config = read_config(path)
    if config.get("stage"):
        return config["stage"]
    if "decoder_model_name" in config and QUERY_REASONER in official_adapter_names(path):
        return "stage2"
    return None


@torch.no_grad()
def ensure_query_reasoner(model: ClaraModel, log=print) -> bool:
    """Give a model without a query reasoner one copied from the compressor, as stage 2 starts.

    Returns True when one was added.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from clara.model import lora_config

    if QUERY_REASONER in model.adapter_names:
        return False
    model.peft_model.add_adapter(QUERY_REASONER, lora_config(model.settings))
    state = get_peft_model_state_dict(model.peft_model, adapter_name="encoder_adapter", save_embedding_layers=False)
    set_peft_model_state_dict(model.peft_model, state, adapter_name=QUERY_REASONER)
    # The new weights take the device and dtype of their encoder twins (LoRA may be kept in float32).
    params = dict(model.peft_model.named_parameters())
    for name, param in params.items():
        if f".{QUERY_REASONER}." in name:
            twin = params[name.replace(f".{QUERY_REASONER}.", ".encoder_adapter.")]
            param.data = param.data.to(device=twin.device, dtype=twin.dtype)
    model.refresh_lora_layers()
    model.requires_grad_(False)
    log(f"{QUERY_REASONER} not in the checkpoint: initialised as a copy of encoder_adapter (as stage2 starts)")
    return True


# -- records in the normalised form of clara.data ----------------------------------------------------
def answer_record(question: str, docs: Sequence[str], answer: str = "",
                  pos_index: Sequence[int] | None = None) -> dict:
    """A stage1_2 / stage2 record."""
    return {"question": question, "answer": answer, "docs": list(docs), "pos_index": list(pos_index or []),
            "has_pos_index": pos_index is not None}


def paraphrase_record(docs: Sequence[str], paraphrase: str = "") -> dict:
    """A stage1 paraphrase record."""
    return {"data_type": "paraphrase", "questions": [], "answers": [paraphrase], "docs": list(docs)}


def collatable_runs(stage: str, records: list[dict]) -> Iterator[tuple[int, list[dict]]]:
    """Split consecutive records into runs one micro-batch can hold: (offset, run).

    Stage 2 stacks the candidates of a micro-batch, so its samples need equal candidate counts;
    every other stage takes the records as they are.
    """
    start = 0
    while start < len(records):
        end = start + 1
        if stage == "stage2":
            count = len(records[start]["docs"])
            while end < len(records) and len(records[end]["docs"]) == count:
                end += 1
        else:
            end = len(records)
        yield start, records[start:end]
        start = end


def _as_list(items, name: str) -> list:
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise TypeError(f"{name}: expected a list, got {type(items).__name__}")
    return list(items)


class CLaRa:
    """A trained CLaRa model ready for inference; see the module docstring."""

    def __init__(self, model: ClaraModel, stage: str | None = None, device: str | torch.device | None = None,
                 batch_size: int = 8, max_len: int | None = None, seed: int = 42):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.stage = stage
        self.batch_size = batch_size
        self.max_len = max_len
        self.seed = seed  # picks the paraphrase instruction, as in training (--seed, default 42)
        self._index = None  # the corpus index last answered from, kept loaded

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, stage: str | None = None,
                        attn_implementation: str | None = None, base_model: str | None = None,
                        **kwargs) -> "CLaRa":
        """Load a checkpoint directory in the native or the official release layout.

        device None: CUDA when available, else CPU. dtype None: bfloat16 on CUDA, float32 on CPU.
        attn_implementation None: FlashAttention-2 on CUDA when installed, else SDPA.
        base_model replaces the base model the checkpoint names (e.g. a local copy).
        """
        from clara.model import attention_implementation

        target = resolve_device(device)
        if attn_implementation is None:
            attn_implementation = attention_implementation("auto", target.type == "cuda")
        model = load_model(path, resolve_dtype(dtype, target), attn_implementation, base_model=base_model)
        return cls(model, stage=stage or infer_stage(path), device=target, **kwargs)

    # -- helpers -----------------------------------------------------------------------------------------
    def _collator(self, stage: str) -> Collator:
        settings = self.model.settings
        return Collator(stage, self.model.tokenizer, self.model.tokens, settings.doc_max_length,
                        self.max_len or DEFAULT_MAX_LEN[stage], settings.generation_top_k, self.seed,
                        with_targets=False)

    def _generate(self, stage: str, records: list[dict], max_new_tokens: int) -> tuple[list[str], list]:
        collator = self._collator(stage)
        texts, chosen = [], []
        for start in range(0, len(records), self.batch_size):
            for _, run in collatable_runs(stage, records[start:start + self.batch_size]):
                batch = collator(run).to(self.device)
                out, picked = self.model.generate(batch, max_new_tokens=max_new_tokens)
                texts += out
                chosen += picked.tolist() if picked is not None else [None] * len(run)
        return texts, chosen

    # -- the API -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def compress_documents(self, docs: Sequence[str]) -> torch.Tensor:
        """Documents -> their memory vectors [D, n, H] (compressor final hidden states)."""
        docs = _as_list(docs, "docs")
        if not docs:
            return torch.empty(0, self.model.tokens.n_mem, self.model.hidden_size, device=self.device)
        parts = []
        for start in range(0, len(docs), self.batch_size):
            chunk = docs[start:start + self.batch_size]
            ids, mask, _ = encode_documents(self.model.tokenizer, self.model.tokens, chunk,
                                            self.model.settings.doc_max_length)
            parts.append(self.model.compress(ids.to(self.device), mask.to(self.device))[0])
        return torch.cat(parts)

    def generate_from_text(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                           max_new_tokens: int = 64) -> list[str]:
        """Answer each question from its own documents (all of them compressed), as in stage 1_2."""
        questions, documents = _as_list(questions, "questions"), _as_list(documents, "documents")
        if len(questions) != len(documents):
            raise ValueError(f"{len(questions)} questions but {len(documents)} document lists")
        records = [answer_record(q, _as_list(d, f"documents[{i}]"))
                   for i, (q, d) in enumerate(zip(questions, documents))]
        if any(not r["docs"] for r in records):
            raise ValueError("every question needs at least one document")
        return self._generate("stage1_2", records, max_new_tokens)[0]

    def generate_from_questions(self, questions: Sequence[str], documents: Sequence[Sequence[str]] | None = None,
                                max_new_tokens: int = 64, index: str | None = None,
                                stage2_mips: bool = False) -> tuple[list[str], list[list[int]] | list[list[str]]]:
        """Stage 2: the query reasoner picks the top-k of each question's candidates, the generator answers.

        Returns the answers and, per question, the chosen candidate indices in rank order. With
        index=DIR (a folder of `python -m clara.index`; stage2_mips=True, the official flag, asks for
        the same) the candidates are the whole indexed corpus, the generator reads the stored vectors
        and the chosen documents are returned as ids.
        """
        if index is not None or stage2_mips:
            if index is None or documents is not None:
                raise ValueError("answering from a corpus index (stage2_mips) takes index=DIR and no documents")
            return self._generate_from_index(_as_list(questions, "questions"), index, max_new_tokens)
        questions, documents = _as_list(questions, "questions"), _as_list(documents, "documents")
        if len(questions) != len(documents):
            raise ValueError(f"{len(questions)} questions but {len(documents)} candidate lists")
        k = self.model.settings.generation_top_k
        records = [answer_record(q, _as_list(d, f"documents[{i}]"))
                   for i, (q, d) in enumerate(zip(questions, documents))]
        short = [i for i, r in enumerate(records) if len(r["docs"]) < k]
        if short:
            raise ValueError(f"questions {short[:10]} have fewer candidate documents than the checkpoint's "
                             f"generation_top_k={k}")
        ensure_query_reasoner(self.model)
        return self._generate("stage2", records, max_new_tokens)

    def _generate_from_index(self, questions: list[str], path: str, max_new_tokens: int) -> tuple[list, list]:
        # Deferred: faiss is needed only by this path.
        from clara.index import answer_from_index, check_index_matches, load_index

        if self._index is None or self._index.path != path:
            self._index = load_index(path)
        ensure_query_reasoner(self.model)
        check_index_matches(self._index, self.model)
        found = answer_from_index(self.model, self._index, questions, batch_size=self.batch_size,
                                  max_new_tokens=max_new_tokens, max_len=self.max_len or DEFAULT_MAX_LEN["stage2"],
                                  seed=self.seed, device=self.device)
        return found.answers, found.ids

    def generate_from_paraphrase(self, documents: Sequence[str | Sequence[str]],
                                 max_new_tokens: int = 64) -> list[str]:
        """Paraphrase each item (a document, or a list of documents read together), as in stage 1."""
        documents = _as_list(documents, "documents")
        records = [paraphrase_record([d] if isinstance(d, str) else _as_list(d, f"documents[{i}]"))
                   for i, d in enumerate(documents)]
        if any(not r["docs"] for r in records):
            raise ValueError("every item needs at least one document")
        return self._generate("stage1", records, max_new_tokens)[0]
