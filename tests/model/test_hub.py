"""Checkpoints by Hugging Face Hub id: the official release's ids, offline against a Hub cache built here.

No machine here reaches the Hub, so the tests build `HF_HOME/hub/models--owner--name/{refs/main,
snapshots/<commit>/...}` themselves, in the layout huggingface_hub writes, and run the loaders in
fresh processes (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported). The
checkpoints are in the official release layout, on a base model with more embedding rows than its
tokenizer has tokens (as Qwen's), which the official code shrinks to the tokenizer's length. Answers
that need the Hub itself (a gated base, an unknown repository) come from a local stand-in server.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara.data.records import normalise
from clara.model.checkpoint import PEFT_PREFIX, build_model
from clara.model.collate import Collator
from clara.model.model import ModelSettings
from clara.stages import get_stage
from clara.training.tiny import tiny_model_dir
from tests.helpers import DOC_MAX_LENGTH, MAX_LEN, REPO, TOP_K

BASE_ID = "clara-test/tiny-qwen-base"
RELEASE_ID = "clara-test/CLaRa-Tiny-E2E"
MISTRAL_BASED_ID = "clara-test/CLaRa-Mistral-Like"
GATED_BASE = "mistralai/Mistral-7B-Instruct-v0.2"
RATES = {"compression-4": 4, "compression-8": 8}
SPARE_ROWS = 64  # embedding rows beyond the tokenizer's tokens, as in Qwen's checkpoints
ADAPTERS = ["encoder_adapter", "decoder_adapter", "query_reasoner_adapter"]
TOKEN = "hf_clara_test_token"


def stage2_records(count: int = 3) -> list[dict]:
    with open(REPO / "example" / "end_to_end_data.jsonl", encoding="utf-8") as handle:
        raw = [json.loads(line) for line, _ in zip(handle, range(count))]
    for record in raw:  # four candidates: enough to choose from, fast to compress
        record["docs"] = record["docs"][:4]
        record["pos_index"] = [i for i in record["pos_index"] if i < 4]
    return raw


def per_sample_losses(model, raw: list[dict]) -> list[float]:
    """The stage2 eval loss of each sample on its own."""
    collator = Collator(get_stage("stage2"), model.tokenizer, model.tokens, DOC_MAX_LENGTH, MAX_LEN, top_k=TOP_K)
    model.eval()
    with torch.no_grad():
        return [model(collator([normalise(get_stage("stage2"), r, min_docs=TOP_K)])).loss.item() for r in raw]


# -- the Hub cache --------------------------------------------------------------------------------------------
def snapshot_dir(hf_home: Path, repo_id: str, commit: str) -> Path:
    """An empty snapshot of repo_id at commit, which refs/main names, in huggingface_hub's cache layout."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def write_release_folder(model, folder: Path, base_name: str, rate: int) -> None:
    """One subfolder of the release: config.json, adapters.pth (keys as transformers' get_adapter_state_dict
    writes them), decoder_first_last_layers.pth (the tied embedding, tokenizer-sized, memory rows trained)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "decoder_model_name": base_name,
                "compr_rate": rate,
                "doc_max_length": DOC_MAX_LENGTH,
                "generation_top_k": TOP_K,
                "lora_r": 16,
                "sep": True,
                "training_stage": "stage2",
            }
        )
    )
    adapters = {
        name: {
            k.removeprefix(PEFT_PREFIX): v.detach().clone()
            for k, v in get_peft_model_state_dict(
                model.peft_model, adapter_name=name, save_embedding_layers=False
            ).items()
        }
        for name in model.adapter_names
    }
    torch.save(adapters, folder / "adapters.pth")
    embed = model.causal_lm.get_input_embeddings().weight.detach().clone()
    embed[list(model.tokens.mem_ids)] = model.mem_embeddings.detach()
    torch.save({"model.embed_tokens.weight": embed}, folder / "decoder_first_last_layers.pth")


def trained_like(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.05 if ".lora_B." in name else 0.1))
        model.mem_embeddings.add_(torch.randn(model.mem_embeddings.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """HF_HOME with the base model and the release checkpoints; the per-sample losses each should give."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    base.resize_token_embeddings(len(tokenizer) + SPARE_ROWS)
    base_dir = snapshot_dir(hf_home, BASE_ID, "a" * 40)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    release = snapshot_dir(hf_home, RELEASE_ID, "b" * 40)
    (release / "README.md").write_text("A CLaRa release: one checkpoint per compression rate.\n")
    expected = {}
    for folder, rate in RATES.items():
        n_mem = DOC_MAX_LENGTH // rate
        settings = ModelSettings(
            base_model=str(base_dir),
            n_mem_tokens=n_mem,
            compress_rate=rate,
            doc_max_length=DOC_MAX_LENGTH,
            generation_top_k=TOP_K,
        )
        torch.manual_seed(rate)
        # As the official code builds it: the embedding shrunk to the tokenizer's length.
        model = build_model(settings, ADAPTERS, vocab_rows=len(tokenizer) + n_mem + 3)
        trained_like(model, seed=rate)
        expected[folder] = per_sample_losses(model, stage2_records())
        write_release_folder(model, release / folder, BASE_ID, rate)
    # A checkpoint whose base (like the release's Mistral) is gated and not in the cache.
    mistral_like = snapshot_dir(hf_home, MISTRAL_BASED_ID, "c" * 40)
    write_release_folder(model, mistral_like / "compression-4", GATED_BASE, 4)
    return {"hf_home": hf_home, "expected": expected, "base_rows": len(tokenizer) + SPARE_ROWS}


# -- loading in a fresh process ------------------------------------------------------------------------------
PROBE = """
import json, sys
sys.path.insert(0, {repo!r})
from clara import CLaRa
from clara.model.checkpoint import CheckpointError
from tests.model.test_hub import per_sample_losses, stage2_records

results = []
for path, subfolder in json.loads(sys.argv[1]):
    try:
        model = CLaRa.from_pretrained(path, subfolder=subfolder, device="cpu")
        results.append({{"losses": per_sample_losses(model.model, stage2_records()), "stage": model.stage,
                        "embedding_rows": model.model.causal_lm.get_input_embeddings().weight.shape[0]}})
    except CheckpointError as error:
        results.append({{"error": str(error)}})
print("RESULTS " + json.dumps(results))
"""


def hub_env(hf_home: Path, offline: bool, endpoint: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HOME=str(hf_home), HF_TOKEN=TOKEN)
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def probe(
    hub: dict, loads: list[tuple[str, str | None]], offline: bool = True, endpoint: str | None = None
) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(repo=str(REPO)), json.dumps(loads)],
        cwd=REPO,
        env=hub_env(hub["hf_home"], offline, endpoint),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULTS ") :])


@pytest.fixture(scope="module")
def offline_loads(hub) -> list[dict]:
    return probe(
        hub,
        [
            (RELEASE_ID, "compression-8"),
            (f"{RELEASE_ID}/compression-4", None),
            (RELEASE_ID, "compression-99"),
            (RELEASE_ID, None),
            ("clara-test/not-in-the-cache/compression-16", None),
            (f"{MISTRAL_BASED_ID}/compression-4", None),
        ],
    )


def test_release_ids_load_offline_with_the_losses_of_the_checkpoint(hub, offline_loads):
    by_subfolder, by_path = offline_loads[:2]
    for loaded, folder in ((by_subfolder, "compression-8"), (by_path, "compression-4")):
        assert "error" not in loaded, loaded
        assert loaded["stage"] == "stage2"  # a query_reasoner_adapter in the release layout
        # The base has spare rows (Qwen-like); the release's embedding has the tokenizer's length.
        assert loaded["embedding_rows"] < hub["base_rows"]
        assert loaded["losses"] == pytest.approx(hub["expected"][folder], abs=1e-5)
    assert hub["expected"]["compression-8"] != pytest.approx(hub["expected"]["compression-4"], abs=1e-3)


def test_an_unknown_or_missing_subfolder_lists_the_ones_there(offline_loads):
    for loaded in offline_loads[2:4]:
        message = loaded["error"]
        assert "compression-4, compression-8" in message and "in the Hub cache" in message, message
        assert f"{RELEASE_ID}/compression-4" in message  # how to ask for one
    assert "compression-99" in offline_loads[2]["error"]


def test_offline_without_a_cached_copy_says_so(hub, offline_loads):
    checkpoint, base = offline_loads[4]["error"], offline_loads[5]["error"]
    assert "clara-test/not-in-the-cache" in checkpoint
    assert "HF_HUB_OFFLINE=1" in checkpoint and str(hub["hf_home"] / "hub") in checkpoint, checkpoint
    # The checkpoint is cached, its base model is not: the message names the base.
    assert f"base model {GATED_BASE}" in base and "HF_HUB_OFFLINE=1" in base, base


# -- answers only the Hub gives: a stand-in server -------------------------------------------------------
class HubStandIn(BaseHTTPRequestHandler):
    """Gated for the Mistral repository, unknown for 'does-not-exist', and a refusal (400, which clients do
    not retry) for everything else, so that repositories in the cache are used from there."""

    def answer(self) -> None:
        self.server.seen.append((self.path, self.headers.get("authorization")))
        if "mistralai" in self.path:
            status, code = 403, "GatedRepo"
        elif "does-not-exist" in self.path:
            status, code = 404, "RepoNotFound"
        else:
            status, code = 400, None
        body = json.dumps({"error": "stand-in"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"stand-in: {code}")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def online_loads(hub):
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        results = probe(
            hub,
            [
                (f"{MISTRAL_BASED_ID}/compression-4", None),
                ("clara-test/does-not-exist", "x"),
                (RELEASE_ID, "compression-8"),
            ],
            offline=False,
            endpoint=f"http://127.0.0.1:{server.server_address[1]}",
        )
    finally:
        server.shutdown()
    return results, server.seen


def test_a_gated_base_says_to_accept_its_licence_and_set_hf_token(online_loads):
    (gated, _, _), seen = online_loads
    message = gated["error"]
    assert f"{GATED_BASE} is gated" in message and f"https://huggingface.co/{GATED_BASE}" in message, message
    assert "HF_TOKEN" in message
    assert any("mistralai" in path and auth == f"Bearer {TOKEN}" for path, auth in seen)  # HF_TOKEN is sent


def test_an_unknown_repository_says_so(online_loads):
    (_, unknown, _), _ = online_loads
    assert "no repository clara-test/does-not-exist" in unknown["error"], unknown
    assert "HF_TOKEN" in unknown["error"]


def test_a_hub_that_cannot_serve_a_cached_repository_falls_back_to_the_cache(hub, online_loads):
    (_, _, cached), _ = online_loads
    assert cached["losses"] == pytest.approx(hub["expected"]["compression-8"], abs=1e-5)


# -- the command lines --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_and_training_take_a_hub_id(hub, tmp_path):
    data = tmp_path / "e2e.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in stage2_records()))
    out = tmp_path / "samples.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clara.evaluate",
            "--checkpoint",
            f"{RELEASE_ID}/compression-8",
            "--dataset",
            str(data),
            "--batch_size",
            "1",
            "--max_samples",
            "1",
            "--max_new_tokens",
            "4",
            "--output",
            str(out),
            "--no_progress",
        ],
        cwd=REPO,
        env=hub_env(hub["hf_home"], offline=True),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in out.read_text().splitlines()]
    assert losses == pytest.approx(hub["expected"]["compression-8"], abs=1e-5)

    # PRETRAIN_CHECKPOINT / --pretrain_checkpoint: the stage starts from the release's adapters.
    script = (
        "import json, sys; sys.path.insert(0, '.')\n"
        "from clara.config import TrainConfig, resolve, validate\n"
        "from clara.model.stage_model import build_stage_model\n"
        "from clara.stages import get_stage\n"
        "from clara.training.setup import model_settings\n"
        "from tests.model.test_hub import per_sample_losses, stage2_records\n"
        f"cfg = resolve(TrainConfig(stage='stage2', model_path={BASE_ID!r},"
        f" pretrain_checkpoint={RELEASE_ID + '/compression-8'!r},"
        f" doc_max_length={DOC_MAX_LENGTH}, compress_rate=8, generation_top_k={TOP_K}, max_len={MAX_LEN},"
        f" dataset={str(data)!r}))\n"
        "validate(cfg)\n"
        "model = build_stage_model(\n"
        "    model_settings(cfg), cfg.pretrain_checkpoint, get_stage(cfg.stage), log=lambda *a: None\n"
        ")\n"
        "print('LOSSES', json.dumps(per_sample_losses(model, stage2_records())))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=hub_env(hub["hf_home"], offline=True),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LOSSES "))
    assert json.loads(line[len("LOSSES ") :]) == pytest.approx(hub["expected"]["compression-8"], abs=1e-5)


def test_what_reads_as_a_hub_id(monkeypatch):
    monkeypatch.chdir(REPO)
    from clara.config import hub_id_parts

    assert hub_id_parts("apple/CLaRa-7B-Instruct") == ("apple/CLaRa-7B-Instruct", None)
    assert hub_id_parts("apple/CLaRa-7B-Instruct/compression-16") == ("apple/CLaRa-7B-Instruct", "compression-16")
    for local in ("/abs/path", "./rel/path", "~/x/y", "single", "tests/does-not-exist"):  # tests/ is a local dir
        assert hub_id_parts(local) is None, local


def test_the_release_path_to_its_base_reads_as_the_hub_id():
    from clara.config import official_base_name
    from clara.model.checkpoint import CheckpointError

    assert official_base_name("/mnt/ceph_rbd/model/Mistral-7B-Instruct-v0.2", "ckpt") == GATED_BASE
    assert official_base_name("/models/Qwen3-4B-Instruct-2507/", "ckpt") == "Qwen/Qwen3-4B-Instruct-2507"
    assert official_base_name(BASE_ID, "ckpt") == BASE_ID and official_base_name("tiny", "ckpt") == "tiny"
    with pytest.raises(CheckpointError, match="ckpt/config.json.*--model_path"):
        official_base_name("/mnt/somewhere/my-own-model", "ckpt")
