"""Checkpoints (README: "How CLaRa reads a document"): native save/load, the official release layout, and stage
chaining."""

import json
import os
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from clara.data.records import normalise
from clara.model.checkpoint import CheckpointError, load_model, read_config, save_model
from clara.model.collate import Collator
from clara.model.stage_model import build_stage_model
from clara.stages import get_stage
from clara.training.setup import model_settings
from tests.helpers import COMPRESS_RATE, DOC_MAX_LENGTH, MAX_LEN, N_MEM, REPO, TOP_K, small_config

EXAMPLES = REPO / "example"
ADDED = [f"<MEM{i}>" for i in range(N_MEM)] + ["<AE>", "<ENC>", "<SEP>"]


def perturb(model, seed: int, adapters: tuple[str, ...] | None = None) -> None:
    """Move LoRA weights and memory embeddings away from their initial values, as training would.

    Small enough that the tiny model still answers (larger LoRA B or memory noise makes it end
    every answer at once), so that comparing greedy generations means something.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name and (adapters is None or any(f".{a}." in name for a in adapters)):
                std = 0.05 if ".lora_B." in name else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.mem_embeddings.add_(torch.randn(model.mem_embeddings.shape, generator=generator) * 0.1)


def stage_model(stage: str, seed: int = 0, checkpoint: str | None = None):
    torch.manual_seed(seed)
    model = build_stage_model(model_settings(small_config(stage)), checkpoint, get_stage(stage), log=lambda *args: None)
    perturb(model, seed)
    return model


def read_records(stage: str, count: int) -> list[dict]:
    name = {
        "stage1": "pretrain_data.jsonl",
        "stage1_2": "instruction_tuning_data.jsonl",
        "stage2": "end_to_end_data.jsonl",
    }[stage]
    with open(EXAMPLES / name, encoding="utf-8") as handle:
        raw = [json.loads(line) for line, _ in zip(handle, range(count))]
    if stage == "stage2":
        for record in raw:  # four candidates: enough to choose from, fast to compress
            record["docs"] = record["docs"][:4]
            record["pos_index"] = [i for i in record["pos_index"] if i < 4]
    return [normalise(get_stage(stage), r, min_docs=TOP_K if stage == "stage2" else 1) for r in raw]


def batches(model, stage: str):
    records = read_records(stage, 3)

    def make(targets):
        return Collator(
            get_stage(stage), model.tokenizer, model.tokens, DOC_MAX_LENGTH, MAX_LEN, top_k=TOP_K, with_targets=targets
        )(records)

    return make(True), make(False)


def eval_loss(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch).loss


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(model.peft_model, adapter_name=name, save_embedding_layers=False).items()
    }


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def added_rows(model) -> torch.Tensor:
    ids = model.tokenizer.convert_tokens_to_ids(ADDED)
    return model.causal_lm.get_input_embeddings().weight[ids].detach().clone()


# -- native format ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["stage1_2", "stage2"])
def test_save_then_load_gives_identical_losses_and_generations(tmp_path, stage):
    model = stage_model(stage)
    train_batch, generate_batch = batches(model, stage)
    loss = eval_loss(model, train_batch)
    answers, chosen = model.generate(generate_batch, max_new_tokens=8)
    assert any(answers), "degenerate generations would make the comparison meaningless"

    save_model(model, str(tmp_path), stage)
    saved = read_config(str(tmp_path))
    assert saved["format"] == "clara" and saved["format_version"] >= 1 and saved["stage"] == stage
    assert (
        saved["base_model"],
        saved["n_mem_tokens"],
        saved["compress_rate"],
        saved["generation_top_k"],
        saved["lora_r"],
        saved["lora_alpha"],
    ) == ("tiny", N_MEM, COMPRESS_RATE, TOP_K, 16, 32)
    assert set(saved["adapters"]) == set(model.adapter_names)
    rows = load_file(str(tmp_path / "special_tokens.safetensors"))["embed_tokens"]
    assert rows.shape == (len(ADDED), model.hidden_size)  # every added token, <AE> <ENC> <SEP> included
    assert torch.equal(rows[:N_MEM], model.mem_embeddings.detach())  # the trained memory rows are merged in

    torch.manual_seed(1234)  # other random rows for the grown vocabulary: only the saved ones may count
    loaded = load_model(str(tmp_path))
    assert sorted(loaded.adapter_names) == sorted(model.adapter_names)
    for name in model.adapter_names:
        assert_same_state(adapter_state(model, name), adapter_state(loaded, name))
    assert torch.equal(loaded.mem_embeddings, model.mem_embeddings)
    assert torch.equal(added_rows(loaded)[N_MEM:], added_rows(model)[N_MEM:])
    torch.testing.assert_close(eval_loss(loaded, train_batch), loss, rtol=0, atol=0)
    loaded_answers, loaded_chosen = loaded.generate(generate_batch, max_new_tokens=8)
    assert loaded_answers == answers
    if stage == "stage2":
        assert torch.equal(loaded_chosen, chosen)


def test_generation_does_not_depend_on_training_mode():
    model = stage_model("stage1_2")
    _, generate_batch = batches(model, "stage1_2")
    model.eval()
    expected = model.generate(generate_batch, max_new_tokens=8)[0]
    model.train()
    assert model.generate(generate_batch, max_new_tokens=8)[0] == expected
    assert model.training  # and the mode is given back


# -- official release layout -----------------------------------------------------------------------------------
def write_official(model, out: Path, key_style: str, with_lm_head: bool) -> None:
    """The layout of Apple's CLaRa release, written from a ClaraModel.

    The release's model holds its adapters inside the transformers model (transformers' add_adapter), so
    its adapter keys have no "base_model.model." prefix; key_style="peft" writes them with it instead.
    """
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps(
            {
                "decoder_model_name": "tiny",
                "compr_rate": COMPRESS_RATE,
                "doc_max_length": DOC_MAX_LENGTH,
                "generation_top_k": TOP_K,
                "lora_r": 16,
                "sep": True,
                "training_stage": "stage2",
            }
        )
    )
    adapters = {}
    for name in model.adapter_names:
        state = get_peft_model_state_dict(model.peft_model, adapter_name=name, save_embedding_layers=False)
        if key_style == "transformers":
            state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        adapters[name] = {k: v.detach().clone() for k, v in state.items()}
    torch.save(adapters, out / "adapters.pth")
    embed = model.causal_lm.get_input_embeddings().weight.detach().clone()
    embed[list(model.tokens.mem_ids)] = model.mem_embeddings.detach()  # the release trains these rows in place
    layers = {"model.embed_tokens.weight": embed}
    if with_lm_head:
        head = model.causal_lm.get_output_embeddings().weight
        tied = head is model.causal_lm.get_input_embeddings().weight
        layers["lm_head.weight"] = embed.clone() if tied else head.detach().clone()
    torch.save(layers, out / "decoder_first_last_layers.pth")


@pytest.mark.parametrize(
    "key_style,with_lm_head",
    [("transformers", True), ("peft", True), ("transformers", False)],
    ids=["release-keys", "peft-keys", "tied-without-lm-head"],
)
def test_official_release_layout_loads_with_the_same_loss(tmp_path, monkeypatch, key_style, with_lm_head):
    model = stage_model("stage2")
    train_batch, _ = batches(model, "stage2")
    loss = eval_loss(model, train_batch)
    write_official(model, tmp_path / "release", key_style, with_lm_head)

    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.manual_seed(4321)
    loaded = load_model(str(tmp_path / "release"))
    assert loads == [True, True]  # both .pth files, read with weights_only=True

    assert sorted(loaded.adapter_names) == sorted(model.adapter_names)
    for name in model.adapter_names:
        assert_same_state(adapter_state(model, name), adapter_state(loaded, name))
    assert torch.equal(loaded.mem_embeddings, model.mem_embeddings)
    assert (loaded.tokens.n_mem, loaded.settings.generation_top_k) == (N_MEM, TOP_K)
    torch.testing.assert_close(eval_loss(loaded, train_batch), loss, rtol=0, atol=0)


def test_official_layout_with_foreign_adapter_keys_is_refused(tmp_path):
    model = stage_model("stage1_2")
    write_official(model, tmp_path / "release", "transformers", True)
    adapters = torch.load(tmp_path / "release" / "adapters.pth", weights_only=True)
    adapters["decoder_adapter"] = {k.replace("layers.", "blocks."): v for k, v in adapters["decoder_adapter"].items()}
    torch.save(adapters, tmp_path / "release" / "adapters.pth")
    with pytest.raises(CheckpointError, match="decoder_adapter"):
        load_model(str(tmp_path / "release"))


# -- stage chaining ---------------------------------------------------------------------------------------------
def lora_b_is_zero(model, name: str) -> bool:
    return all(v.eq(0).all() for k, v in adapter_state(model, name).items() if ".lora_B." in k)


def trained_roles(model) -> set[str]:
    roles = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            roles |= {a for a in ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter") if f".{a}." in name}
    return roles


def test_stage_chaining_initialises_the_adapters_the_spec_lists(tmp_path):
    # stage1 -> stage1_2: the compressor comes from stage1, the generator starts fresh.
    stage1 = stage_model("stage1", seed=1)
    save_model(stage1, str(tmp_path / "s1"), "stage1")
    s12 = build_stage_model(
        model_settings(small_config("stage1_2")), str(tmp_path / "s1"), get_stage("stage1_2"), log=lambda *a: None
    )
    assert_same_state(adapter_state(stage1, "encoder_adapter"), adapter_state(s12, "encoder_adapter"))
    assert torch.equal(s12.mem_embeddings, stage1.mem_embeddings)
    assert lora_b_is_zero(s12, "decoder_adapter") and not lora_b_is_zero(stage1, "decoder_adapter")
    assert "query_reasoner_adapter" not in s12.adapter_names
    assert trained_roles(s12) == {"encoder_adapter", "decoder_adapter"} and s12.mem_embeddings.requires_grad

    # stage1_2 -> stage2: compressor and generator loaded; no reasoner saved, so it copies the compressor.
    perturb(s12, seed=2, adapters=("decoder_adapter",))
    save_model(s12, str(tmp_path / "s12"), "stage1_2")
    s2 = build_stage_model(
        model_settings(small_config("stage2")), str(tmp_path / "s12"), get_stage("stage2"), log=lambda *a: None
    )
    encoder = adapter_state(s12, "encoder_adapter")
    assert_same_state(encoder, adapter_state(s2, "encoder_adapter"))
    assert_same_state(adapter_state(s12, "decoder_adapter"), adapter_state(s2, "decoder_adapter"))
    assert_same_state(encoder, adapter_state(s2, "query_reasoner_adapter"))
    assert trained_roles(s2) == {"query_reasoner_adapter", "decoder_adapter"}
    with torch.no_grad():  # a copy, not shared weights
        next(p for n, p in s2.named_parameters() if ".query_reasoner_adapter." in n).add_(1.0)
    assert_same_state(encoder, adapter_state(s2, "encoder_adapter"))

    # A checkpoint that has a query reasoner: stage2 loads it rather than copying the compressor.
    perturb(s2, seed=3, adapters=("query_reasoner_adapter",))
    save_model(s2, str(tmp_path / "s2"), "stage2")
    again = build_stage_model(
        model_settings(small_config("stage2")), str(tmp_path / "s2"), get_stage("stage2"), log=lambda *a: None
    )
    reasoner = adapter_state(s2, "query_reasoner_adapter")
    assert_same_state(reasoner, adapter_state(again, "query_reasoner_adapter"))
    assert any(not torch.equal(reasoner[k], encoder[k]) for k in reasoner)
    assert_same_state(encoder, adapter_state(again, "encoder_adapter"))


def test_chaining_with_another_number_of_memory_tokens_is_refused(tmp_path):
    stage1 = stage_model("stage1")
    save_model(stage1, str(tmp_path / "s1"), "stage1")
    with pytest.raises(CheckpointError, match="memory tokens"):
        build_stage_model(
            model_settings(small_config("stage1_2", doc_max_length=2 * DOC_MAX_LENGTH)),
            str(tmp_path / "s1"),
            get_stage("stage1_2"),
            log=lambda *a: None,
        )
    assert os.path.isfile(tmp_path / "s1" / "config.json")


def test_a_tiny_model_checkpoint_keeps_the_tiny_build_it_was_trained_on(tmp_path, monkeypatch):
    from clara.training import tiny

    current_build = tiny.tiny_model_dir()
    model = stage_model("stage1")
    save_model(model, str(tmp_path / "s1"), "stage1")
    config_path = tmp_path / "s1" / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved["base_model"] == "tiny" and saved["tiny_version"] == tiny.tiny_version()

    # The name an earlier clara gave the same shipped weights (recipe.json's earlier_versions) loads them.
    earlier = json.loads((Path(current_build) / tiny.RECIPE_FILE).read_text())["earlier_versions"][0]
    config_path.write_text(json.dumps({**saved, "tiny_version": earlier}))
    assert load_model(str(tmp_path / "s1")).settings.base_model == "tiny"

    # A checkpoint of another recipe's tiny model: refused while that build is not kept in CLARA_HOME ...
    old = "tiny-000000000000"
    config_path.write_text(json.dumps({**saved, "tiny_version": old}))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CLARA_HOME", str(home))
    with pytest.raises(CheckpointError, match=f"{old}.*ships {tiny.tiny_version()}.*retrain"):
        load_model(str(tmp_path / "s1"))
    # ... and loaded on that build (here a copy of the current one) when it is.
    (home / old).symlink_to(current_build)
    reloaded = load_model(str(tmp_path / "s1"))
    assert reloaded.settings.base_model == str(home / old)
    batch, _ = batches(model, "stage1")
    assert torch.equal(eval_loss(model, batch), eval_loss(reloaded, batch))
