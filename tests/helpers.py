"""What several test files need, written once: the repository's folders, the environment of a child process,
running `python -m MODULE` in one, reading a JSON-lines file, the shared stage-2 model's settings, a PDF of a text,
and a stage2 checkpoint of the tiny model whose roles compute something of their own (the index and serving tests),
and the data key a training run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example"
# The session's shared stage-2 model (tests/conftest.py: trained_checkpoints, trained_index): the documents each
# question is answered from, and how many example documents its index holds.
SHARED_TOP_K = 5
SHARED_INDEX_DOCUMENTS = 40
# The small model of the model-level unit tests (tests/model/, tests/evaluation/test_debug.py): 32-token
# documents read into 4 memory tokens, 2 documents per question.
DOC_MAX_LENGTH = 32
COMPRESS_RATE = 8
N_MEM = DOC_MAX_LENGTH // COMPRESS_RATE
TOP_K = 2
MAX_LEN = 512


def subprocess_env(**overrides) -> dict:
    """This process's environment for a child: one thread, no colours, this checkout first on the path, and
    no torchrun rank left over."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), NO_COLOR="1", **overrides)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_module(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m ARGS...` from the repository's root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=subprocess_env() if env is None else env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def run_torchrun(args: list[str], processes: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m ARGS...` as `processes` processes of one torchrun job on this machine."""
    return run_module(
        ["torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", *args], timeout=timeout
    )


def vllm_python() -> str:
    """The python of vLLM's environment for the `vllm` tests: $CLARA_VLLM_PYTHON, or the one
    scripts/make_vllm_env.sh makes by default."""
    env = os.environ.get("CLARA_VLLM_ENV") or str(Path.home() / ".cache" / "clara" / "vllm-env")
    return os.environ.get("CLARA_VLLM_PYTHON") or str(Path(env) / "bin" / "python")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_pdf(path, text: str, lines_per_page: int = 50) -> None:
    """A PDF of text, made as the example documents' PDF is: by scripts/text_to_pdf.py."""
    source = Path(f"{path}.txt")
    source.write_text(text, encoding="utf-8")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "text_to_pdf.py"), str(source), str(path)]
        + ["--lines_per_page", str(lines_per_page)],
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    source.unlink()


ROLES = ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter")


def noisy_checkpoint(path: Path, seeds: dict[str, int], top_k: int = 3) -> Path:
    """A stage2 checkpoint whose adapters hold seeded noise (LoRA B starts at zero: a no-op otherwise)."""
    import torch

    from clara.model.checkpoint import build_model, save_model
    from clara.model.model import ModelSettings

    settings = ModelSettings(
        base_model="tiny", n_mem_tokens=4, compress_rate=32, doc_max_length=128, generation_top_k=top_k
    )
    torch.manual_seed(0)
    model = build_model(settings, list(ROLES))
    with torch.no_grad():
        for number, (name, param) in enumerate(model.peft_model.named_parameters()):
            role = next((r for r in ROLES if f".{r}." in name), None)
            if role is not None and "lora_B" in name:
                generator = torch.Generator().manual_seed(seeds[role] * 1000 + number)
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    save_model(model, str(path), "stage2")
    return path


def noisy_pair(folder: Path) -> dict[str, Path]:
    """Noisy checkpoints "a" and "b" (folder/ck_a, folder/ck_b) that differ in every role."""
    return {
        "a": noisy_checkpoint(folder / "ck_a", {r: i + 1 for i, r in enumerate(ROLES)}),
        "b": noisy_checkpoint(folder / "ck_b", {r: i + 11 for i, r in enumerate(ROLES)}),
    }


def run_data_key(cfg) -> dict:
    """The data key a training run with settings `cfg` (a resolved clara.config.TrainConfig) records, as the
    trainer computes it."""
    from clara.config import data_settings
    from clara.data.fingerprint import train_data_key
    from clara.data.spec import parse_source

    return train_data_key(
        parse_source(cfg.dataset), cfg.stage, cfg.model_path, cfg.pretrain_checkpoint, data_settings(cfg)
    )


def small_config(stage: str, doc_max_length: int = DOC_MAX_LENGTH):
    """The settings of `stage` on the tiny model with the unit tests' small lengths (a clara.config.TrainConfig)."""
    from clara.config import TrainConfig

    return TrainConfig(
        stage=stage,
        model_path="tiny",
        allow_no_checkpoint=True,
        doc_max_length=doc_max_length,
        compress_rate=COMPRESS_RATE,
        generation_top_k=TOP_K,
        max_len=MAX_LEN,
    )


def index_example_documents(model, checkpoint: Path, out: Path, count: int = SHARED_INDEX_DOCUMENTS) -> Path:
    """The corpus index at `out` of the first `count` example documents, compressed by `model` (a ClaraModel
    loaded from `checkpoint`)."""
    from clara.index.build import build_index

    docs = read_jsonl(EXAMPLE / "corpus.jsonl")[:count]
    ids, texts = [d["id"] for d in docs], [d["text"] for d in docs]
    build_index(
        model, ids, texts, str(out), batch_size=8, checkpoint=str(checkpoint), show_progress=False, log=lambda *a: None
    )
    return out
