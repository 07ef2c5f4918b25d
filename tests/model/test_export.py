"""`python -m clara.export`: our checkpoints in the official release layout, and back (issue 11 point 6)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clara.model import export
from clara.model.checkpoint import load_model, save_model
from clara.model.stage_model import build_stage_model
from clara.stages import get_stage
from clara.training.setup import model_settings
from tests.helpers import COMPRESS_RATE, DOC_MAX_LENGTH, REPO, TOP_K, small_config
from tests.model.test_hub import per_sample_losses, stage2_records, trained_like


def run_export(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "clara.export", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> tuple[Path, list[float], object]:
    """A trained-like stage2 checkpoint in the native layout, and its per-sample losses."""
    torch.manual_seed(0)
    model = build_stage_model(model_settings(small_config("stage2")), None, get_stage("stage2"), log=lambda *a: None)
    trained_like(model, seed=5)
    path = tmp_path_factory.mktemp("native") / "clara_stage2"
    save_model(model, str(path), "stage2")
    return path, per_sample_losses(load_model(str(path)), stage2_records()), model


def test_official_export_has_the_release_layout_and_loads_back_with_the_same_losses(native, tmp_path):
    path, losses, model = native
    out = tmp_path / "compression-8"
    proc = run_export("--checkpoint", str(path), "--format", "official", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())
    assert {
        k: config[k]
        for k in (
            "decoder_model_name",
            "compr_rate",
            "doc_max_length",
            "generation_top_k",
            "lora_r",
            "sep",
            "training_stage",
            "lora",
            "different_mem_tokens",
        )
    } == {
        "decoder_model_name": "tiny",
        "compr_rate": COMPRESS_RATE,
        "doc_max_length": DOC_MAX_LENGTH,
        "generation_top_k": TOP_K,
        "lora_r": 16,
        "sep": True,
        "training_stage": "stage2",
        "lora": True,
        "different_mem_tokens": True,
    }
    assert config["model_type"] == "CLaRa" and config["compr_model_name"] is None

    adapters = torch.load(out / "adapters.pth", map_location="cpu", weights_only=True)
    assert sorted(adapters) == sorted(model.adapter_names)
    for state in adapters.values():  # transformers' naming: relative to the causal LM, no adapter name
        assert state and all(k.startswith("model.layers.") and ".lora_" in k for k in state)
        assert not any("base_model" in k or "_adapter" in k for k in state)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in adapters["decoder_adapter"]

    layers = torch.load(out / "decoder_first_last_layers.pth", map_location="cpu", weights_only=True)
    assert list(layers) == ["model.embed_tokens.weight"]  # the tiny model ties its LM head to the embedding
    embed = layers["model.embed_tokens.weight"]
    assert embed.shape == (len(model.tokenizer), model.hidden_size)
    assert torch.equal(embed[list(model.tokens.mem_ids)], model.mem_embeddings.detach())
    assert (out / "tokenizer.json").is_file()

    torch.manual_seed(99)  # other random rows for the grown vocabulary: only the exported ones may count
    assert per_sample_losses(load_model(str(out)), stage2_records()) == pytest.approx(losses, abs=1e-5)

    # ... and back to the native layout.
    again = tmp_path / "native_again"
    proc = run_export("--checkpoint", str(out), "--format", "native", "--out", str(again))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((again / "config.json").read_text())["stage"] == "stage2"
    assert per_sample_losses(load_model(str(again)), stage2_records()) == pytest.approx(losses, abs=1e-5)


def test_push_to_hub_uploads_the_export_into_the_release_subfolder(native, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    out = tmp_path / "export"
    assert (
        export.main(
            [
                "--checkpoint",
                str(native[0]),
                "--format",
                "official",
                "--out",
                str(out),
                "--push_to_hub",
                "someone/clara-tiny",
            ]
        )
        == 0
    )
    assert calls[0] == ("create", "someone/clara-tiny", {"exist_ok": True})
    upload = calls[1][1]
    assert (upload["folder_path"], upload["repo_id"], upload["path_in_repo"]) == (
        str(out),
        "someone/clara-tiny",
        f"compression-{COMPRESS_RATE}",
    )
    assert "someone/clara-tiny/compression-8" in capsys.readouterr().out  # how to load it back


def test_an_official_checkpoint_without_a_stage_needs_stage(native, tmp_path):
    out = tmp_path / "official"
    proc = run_export("--checkpoint", str(native[0]), "--format", "official", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = torch.load(out / "adapters.pth", weights_only=True)
    del adapters["query_reasoner_adapter"]  # now it looks like stage1 / stage1_2, which the release does not record
    torch.save(adapters, out / "adapters.pth")
    config = json.loads((out / "config.json").read_text())
    del config["training_stage"]
    (out / "config.json").write_text(json.dumps(config))
    proc = run_export("--checkpoint", str(out), "--format", "native", "--out", str(tmp_path / "native"))
    assert proc.returncode == 2 and "--stage" in proc.stderr and "Traceback" not in proc.stderr
