"""Evaluation (`python -m clara.evaluate`, evaluation inside training) and the CLaRa inference API.

Tiny checkpoints of the three stages are trained once per module (two optimizer steps each,
with --eval_dataset so that the trainer's own evaluation runs too). The models are untrained
for practical purposes: these tests check plumbing and agreement between code paths (CLI vs.
trainer vs. a hand-made forward, one process vs. two, native vs. official layout), not quality.
Subprocesses run with OMP_NUM_THREADS=1, as torchrun's workers do, so that one- and
two-process runs use the same kernels.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from clara.evaluation import command as evaluate
from clara.evaluation.evaluate import EvalSettings, evaluate_stage
from clara.evaluation.inference import CLaRa
from clara.evaluation.metrics import ANSWER_SCORE_NAMES
from clara.stages import get_stage
from tests.helpers import REPO, read_jsonl, run_module, run_torchrun

EXAMPLE = REPO / "example"
EVAL_SOURCES = {
    "stage1": EXAMPLE / "pretrain_data_eval.jsonl",
    "stage1_2": EXAMPLE / "instruction_tuning_data_eval.jsonl",
    "stage2": EXAMPLE / "end_to_end_data_eval.jsonl",
}
STAGES = ("stage1", "stage1_2", "stage2")
PREVIOUS = {"stage1_2": "stage1", "stage2": "stage1_2"}
N_EVAL = 5  # samples in each eval file
GENERATED = 3  # --eval_max_samples / --max_samples: samples 3 and 4 are not generated
# Micro-batch of training, of the trainer's evaluation and of the CLI: micro-batch 1 holds samples 2
# (generated) and 3 (not).
BATCH = 2
NEW_TOKENS = 8
NO_POS_INDEX = 4  # the stage2 eval sample without pos_index


def assert_rows_match(got: list[dict], expected: list[dict], rel: float = 1e-5) -> None:
    """Same keys and values; floats within a relative tolerance (different batch paddings / thread counts)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float) or isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), key
            else:
                assert a[key] == b[key], key


# -- fixtures: data, checkpoints, one CLI run per stage -------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def eval_files(workdir) -> dict[str, Path]:
    files = {}
    for stage, source in EVAL_SOURCES.items():
        lines = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:N_EVAL]]
        if stage == "stage2":
            del lines[NO_POS_INDEX]["pos_index"]  # counted as retrieval_skipped
        path = workdir / f"{stage}_eval.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        files[stage] = path
    return files


@pytest.fixture(scope="module")
def checkpoints(workdir, eval_files) -> dict[str, Path]:
    """stage1 -> stage1_2 -> stage2, two optimizer steps each, evaluated by the trainer at the end."""
    paths = {}
    for stage in STAGES:
        save = workdir / f"ckpt_{stage}"
        args = [
            "clara.train",
            "--stage",
            stage,
            "--save_path",
            str(save),
            "--max_steps",
            "2",
            "--batch_size",
            str(BATCH),
            "--micro_batch_size",
            str(BATCH),
            "--max_samples",
            "16",
            "--debug_mode",
            "false",
            "--eval_dataset",
            str(eval_files[stage]),
            "--eval_max_samples",
            str(GENERATED),
            "--max_new_tokens",
            str(NEW_TOKENS),
        ]
        if stage in PREVIOUS:
            args += ["--pretrain_checkpoint", str(paths[PREVIOUS[stage]])]
        proc = run_module(args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        paths[stage] = save
    return paths


def evaluate_args(checkpoint: Path, dataset: Path, output: Path) -> list[str]:
    """clara.evaluate's arguments: the first GENERATED records of `dataset`, BATCH at a time, rows to `output`."""
    return [
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        str(dataset),
        "--max_samples",
        str(GENERATED),
        "--batch_size",
        str(BATCH),
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--output",
        str(output),
    ]


@pytest.fixture(scope="module")
def cli_runs(workdir, checkpoints, eval_files) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`python -m clara.evaluate` once per stage; the stage is read from the checkpoint (no --stage)."""
    runs = {}
    for stage in STAGES:
        output = workdir / f"cli_{stage}.jsonl"
        proc = run_module(["clara.evaluate", *evaluate_args(checkpoints[stage], eval_files[stage], output)])
        runs[stage] = (proc, output)
    return runs


# -- the command line --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_cli_prints_table_and_writes_per_sample_file(stage, cli_runs, checkpoints):
    proc, output = cli_runs[stage]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    assert f"{stage} evaluation of {checkpoints[stage]}" in proc.stdout
    table = {
        line.split()[0]: line.split()[1]
        for line in proc.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[0] in ("loss", "samples", "exact_match", "recall@1")
    }
    assert table["samples"] == str(N_EVAL)
    assert float(table["loss"]) > 0
    assert ("exact_match" in table) == (stage != "stage1")
    assert ("recall@1" in table) == (stage == "stage2")
    assert "eval " in proc.stderr  # the progress bar

    rows = read_jsonl(output)
    assert [r["index"] for r in rows] == list(range(N_EVAL))
    for i, row in enumerate(rows):
        assert {"question", "answer", "loss", "token_accuracy"} <= row.keys()
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        if stage == "stage1":
            assert "prediction" not in row and "exact_match" not in row
            continue
        generated = i < GENERATED
        for key in ("prediction", *ANSWER_SCORE_NAMES):
            assert (row[key] is not None) == generated, (i, key)
        if stage == "stage2":
            assert len(row["chosen"]) == 5 and len(set(row["chosen"])) == 5
            assert all(0 <= c < 20 for c in row["chosen"])
            assert (row["pos_index"] is None) == (i == NO_POS_INDEX)
        else:
            assert "chosen" not in row

    summary_file = Path(evaluate.summary_path(str(output)))
    assert summary_file == output.with_name(f"cli_{stage}.summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["stage"] == stage
    metrics = summary["metrics"]
    assert metrics["samples"] == N_EVAL
    assert metrics["loss"] == pytest.approx(sum(r["loss"] for r in rows) / N_EVAL)
    if stage != "stage1":
        assert metrics["generated"] == GENERATED
        assert metrics["f1"] == pytest.approx(sum(r["f1"] for r in rows[:GENERATED]) / GENERATED)
    if stage == "stage2":
        assert metrics["retrieval_samples"] == N_EVAL - 1 and metrics["retrieval_skipped"] == 1
        assert {"recall@1", "recall@3", "recall@5", "precision@1"} <= metrics.keys()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_per_sample_loss_is_the_training_loss_of_that_sample(stage, cli_runs, checkpoints, eval_files):
    """A one-sample training forward (eval mode, LM loss only) gives the loss the batched evaluation wrote."""
    from clara.data.load import load_records
    from clara.data.spec import parse_source
    from clara.model.checkpoint import load_model
    from clara.model.collate import Collator

    rows = read_jsonl(cli_runs[stage][1])
    model = load_model(str(checkpoints[stage])).eval()
    records = load_records(get_stage(stage), parse_source(str(eval_files[stage])), log=lambda *a: None)
    collator = Collator(
        get_stage(stage),
        model.tokenizer,
        model.tokens,
        model.settings.doc_max_length,
        1024 if stage == "stage2" else 2048,
        model.settings.generation_top_k,
        42,
    )
    with torch.no_grad():
        for i, row in enumerate(rows):
            out = model(collator([records[i]]), mse_weight=0.0)
            assert row["loss"] == pytest.approx(out.loss.item(), rel=1e-5), i
            assert row["answer_tokens"] == out.lm.targets.numel()
            assert row["correct_tokens"] == int((out.lm.logits.argmax(-1) == out.lm.targets).sum())
            if stage == "stage2":
                assert row["chosen"] == out.chosen[0].tolist()


def trainer_and_cli_metrics(stage, cli_runs, checkpoints) -> tuple[dict, dict]:
    logged = [r for r in read_jsonl(checkpoints[stage] / "metrics.jsonl") if "eval_loss" in r]
    assert logged and logged[-1]["step"] == 2
    metrics = json.loads(Path(evaluate.summary_path(str(cli_runs[stage][1]))).read_text())["metrics"]
    return logged[-1], metrics


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_evaluation_during_training_logs_the_same_metrics(stage, cli_runs, checkpoints):
    """The trainer's final evaluation (of the model in training) equals the CLI's (of its export)."""
    logged, metrics = trainer_and_cli_metrics(stage, cli_runs, checkpoints)
    assert {k for k in logged if k != "step"} == {f"eval_{k}" for k in metrics}
    for key, value in metrics.items():
        got = logged[f"eval_{key}"]
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), key
        else:
            assert got == value, key
    assert ("eval_exact_match" in logged) == (stage != "stage1")
    assert ("eval_recall@1" in logged) == (stage == "stage2")


@pytest.mark.slow
def test_generation_is_greedy_and_repeatable(workdir, cli_runs, checkpoints, eval_files, capsys):
    from clara.data.load import load_records
    from clara.data.spec import parse_source
    from clara.model.checkpoint import load_model
    from clara.model.collate import Collator
    from clara.stages.prompts import end_of_turn

    stage = "stage1_2"
    outputs = []
    for attempt in range(2):
        output = workdir / f"repeat_{attempt}.jsonl"
        code = evaluate.main([*evaluate_args(checkpoints[stage], eval_files[stage], output), "--no_progress"])
        assert code == 0
        outputs.append(read_jsonl(output))
    assert outputs[0] == outputs[1]
    cli = read_jsonl(cli_runs[stage][1])  # another process
    assert [r["prediction"] for r in outputs[0]] == [r["prediction"] for r in cli]

    # Greedy: the argmax token at every step, recomputed here without generate() or a KV cache.
    model = load_model(str(checkpoints[stage])).eval()
    records = load_records(get_stage(stage), parse_source(str(eval_files[stage])), log=lambda *a: None)
    prompt = Collator(
        get_stage(stage),
        model.tokenizer,
        model.tokens,
        model.settings.doc_max_length,
        2048,
        model.settings.generation_top_k,
        42,
        with_targets=False,
    )
    stops = {model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids(end_of_turn(model.tokenizer))}
    # CLaRa's own tokens (<MEMi>, <AE>, <ENC>, <SEP>) are not text and are never generated.
    added = list(model.tokens.mem_ids) + [model.tokens.ae_id, model.tokens.enc_id, model.tokens.sep_id]
    with torch.no_grad():
        for i in range(GENERATED):
            batch = prompt([records[i]])
            embeds, _ = model.decoder_inputs(batch)
            tokens = []
            with model.adapter("decoder_adapter"):
                for _ in range(NEW_TOKENS):
                    logits = model.causal_lm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
                    logits[added] = float("-inf")
                    token = int(logits.argmax())
                    if token in stops:
                        break
                    tokens.append(token)
                    embeds = torch.cat([embeds, model.causal_lm.get_input_embeddings()(torch.tensor([[token]]))], 1)
            text = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            assert text == cli[i]["prediction"], i


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(workdir, cli_runs, checkpoints, eval_files):
    """Stage 2 on 5 samples in micro-batches of 2: rank 0 takes micro-batches 0 and 2, rank 1 micro-batch 1."""
    stage = "stage2"
    output = workdir / "torchrun_stage2.jsonl"
    proc = run_torchrun(["clara.evaluate", *evaluate_args(checkpoints[stage], eval_files[stage], output)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stage2 evaluation of") == 1  # rank 0 prints
    assert "2 process(es)" in proc.stdout
    one = cli_runs[stage][1]
    assert_rows_match(read_jsonl(output), read_jsonl(one))
    two_summary = json.loads(Path(evaluate.summary_path(str(output))).read_text())
    one_summary = json.loads(Path(evaluate.summary_path(str(one))).read_text())
    assert two_summary["world_size"] == 2 and one_summary["world_size"] == 1
    assert_rows_match([two_summary["metrics"]], [one_summary["metrics"]])


@pytest.mark.slow
def test_recall_at_k_on_forced_scores(workdir, checkpoints, monkeypatch):
    """Scores forced to one known ranking: candidates in order 1, 4, 2, 3, 5, 0; top-5 = [1, 4, 2, 3, 5]."""
    import clara.model.model
    from clara.data.load import load_records
    from clara.data.spec import parse_source
    from clara.model.checkpoint import load_model

    forced = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])

    def forced_scores(queries, candidates):
        return forced[: candidates.shape[1]].to(candidates).expand(candidates.shape[0], -1)

    monkeypatch.setattr(clara.model.model, "cosine_scores", forced_scores)
    numbers = "one two three four five six".split()
    docs = [f"Place{i} is a village. Its lucky number is {n}." for i, n in enumerate(numbers)]
    positives = [[1], [2, 0], [3], None, [0]]
    path = workdir / "forced.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for i, pos in enumerate(positives):
            record = {"question": f"What is the lucky number of Place{i}?", "answer": "one", "docs": docs}
            if pos is not None:
                record["pos_index"] = pos
            out.write(json.dumps(record) + "\n")
    model = load_model(str(checkpoints["stage2"]))
    model.train()
    records = load_records(get_stage("stage2"), parse_source(str(path)), min_docs=5, log=lambda *a: None)
    settings = EvalSettings(batch_size=2, generate_limit=1, max_new_tokens=2, max_len=1024, seed=42)
    results = evaluate_stage(model, records, get_stage("stage2"), settings, show_progress=False)
    assert model.training and all(m.training for m in model.modules())  # put back in train mode

    assert [r["chosen"] for r in results["samples"]] == [[1, 4, 2, 3, 5]] * len(positives)
    summary = results["summary"]
    expected = {
        "recall@1": 1 / 4,
        "recall@3": (1 + 0.5) / 4,
        "recall@5": (1 + 0.5 + 1) / 4,
        "precision@1": 1 / 4,
        "precision@3": (1 / 3 + 1 / 3) / 4,
        "precision@5": 3 * (1 / 5) / 4,
        "retrieval_samples": 4,
        "retrieval_skipped": 1,
    }
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key


# -- the CLaRa API -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_clara_api_on_a_stage1_2_checkpoint(cli_runs, checkpoints, eval_files):
    from clara import CLaRa as exported

    assert exported is CLaRa
    model = CLaRa.from_pretrained(str(checkpoints["stage1_2"]), batch_size=BATCH)
    assert model.stage == "stage1_2" and model.device.type == "cpu" and not model.model.training
    records = read_jsonl(eval_files["stage1_2"])[:GENERATED]
    questions = [r["question"] for r in records]
    documents = [r["docs"] for r in records]

    vectors, _ = model.compress_documents(documents[0] + documents[1])  # (embeddings, mse) as officially
    n = model.model.tokens.n_mem
    assert vectors.shape == (len(documents[0]) + len(documents[1]), n, model.model.hidden_size)
    single, _ = model.compress_documents([documents[1][0]])
    torch.testing.assert_close(vectors[len(documents[0])], single[0], rtol=1e-4, atol=1e-5)

    answers = model.generate_from_text(questions, documents, max_new_tokens=NEW_TOKENS)
    cli = read_jsonl(cli_runs["stage1_2"][1])
    assert answers == [r["prediction"] for r in cli[:GENERATED]]
    assert model.generate_from_text(questions, documents, max_new_tokens=NEW_TOKENS) == answers

    paraphrases = model.generate_from_paraphrase(["", ""], [documents[0][0], documents[1]], max_new_tokens=NEW_TOKENS)
    assert len(paraphrases) == 2 and all(isinstance(p, str) for p in paraphrases)
    with pytest.raises(ValueError, match="questions but"):
        model.generate_from_text(questions, documents[:1])


@pytest.mark.slow
def test_clara_api_on_a_stage2_checkpoint(cli_runs, checkpoints, eval_files):
    model = CLaRa.from_pretrained(str(checkpoints["stage2"]), device="cpu", dtype="float32", batch_size=BATCH)
    assert model.stage == "stage2"
    records = read_jsonl(eval_files["stage2"])[:GENERATED]
    answers, chosen = model.generate_from_questions(
        [r["question"] for r in records], [r["docs"] for r in records], max_new_tokens=NEW_TOKENS
    )
    cli = read_jsonl(cli_runs["stage2"][1])
    assert answers == [r["prediction"] for r in cli[:GENERATED]]
    assert chosen.tolist() == [r["chosen"] for r in cli[:GENERATED]]  # a [B, k] tensor, as officially
    with pytest.raises(ValueError, match="fewer candidate documents"):
        model.generate_from_questions(["q"], [["only one document"]])


# -- the official release layout ---------------------------------------------------------------------------
def export_official(native: Path, out: Path, with_reasoner: bool = True) -> Path:
    """Write a native checkpoint in the layout of Apple's release (what its loader reads)."""
    from peft import get_peft_model_state_dict

    from clara.model.checkpoint import load_model

    model = load_model(str(native))
    out.mkdir()
    settings = model.settings
    (out / "config.json").write_text(
        json.dumps(
            {
                "decoder_model_name": settings.base_model,
                "compr_rate": settings.compress_rate,
                "doc_max_length": settings.doc_max_length,
                "generation_top_k": settings.generation_top_k,
                "lora_r": settings.lora_r,
                "sep": True,
            }
        )
    )
    adapters = {
        name: get_peft_model_state_dict(model.peft_model, adapter_name=name, save_embedding_layers=False)
        for name in model.adapter_names
        if with_reasoner or name != "query_reasoner_adapter"
    }
    torch.save(adapters, out / "adapters.pth")
    embed = model.causal_lm.get_input_embeddings().weight.detach().clone()
    embed[list(model.tokens.mem_ids)] = model.mem_embeddings.detach()
    head = model.causal_lm.get_output_embeddings().weight.detach().clone()
    if head.data_ptr() == model.causal_lm.get_input_embeddings().weight.data_ptr() or torch.equal(
        head, model.causal_lm.get_input_embeddings().weight
    ):
        head = embed.clone()
    torch.save(
        {"decoder.model.embed_tokens.weight": embed, "decoder.lm_head.weight": head},
        out / "decoder_first_last_layers.pth",
    )
    return out


@pytest.mark.slow
def test_official_layout_checkpoints(workdir, cli_runs, checkpoints, eval_files, capsys):
    official = export_official(checkpoints["stage2"], workdir / "official_stage2")
    output = workdir / "official_stage2.jsonl"
    args = [
        "--max_samples",
        str(GENERATED),
        "--batch_size",
        str(BATCH),
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--no_progress",
    ]
    # No stage recorded: a query_reasoner_adapter means stage2.
    assert (
        evaluate.main(
            ["--checkpoint", str(official), "--dataset", str(eval_files["stage2"]), "--output", str(output), *args]
        )
        == 0
    )
    assert "stage2 evaluation of" in capsys.readouterr().out
    assert_rows_match(read_jsonl(output), read_jsonl(cli_runs["stage2"][1]))

    # Without a reasoner, stage1 and stage1_2 look alike: --stage is required.
    no_reasoner = export_official(checkpoints["stage1_2"], workdir / "official_stage1_2", with_reasoner=False)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(no_reasoner), "--dataset", str(eval_files["stage1_2"])]) == 2
    err = capsys.readouterr().err
    assert "--stage" in err and len(err.strip().splitlines()) == 1
    output = workdir / "official_stage1_2.jsonl"
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(no_reasoner),
                "--stage",
                "stage1_2",
                "--dataset",
                str(eval_files["stage1_2"]),
                "--output",
                str(output),
                *args,
            ]
        )
        == 0
    )
    assert_rows_match(read_jsonl(output), read_jsonl(cli_runs["stage1_2"][1]))


# -- user errors -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_user_errors_exit_2_with_one_clear_message(workdir, checkpoints, eval_files, capsys):
    checkpoint = str(checkpoints["stage1_2"])

    def fails(args: list[str]) -> str:
        assert evaluate.main(args) == 2
        return capsys.readouterr().err

    not_a_checkpoint = workdir / "not_a_checkpoint"
    not_a_checkpoint.mkdir()
    err = fails(["--checkpoint", str(not_a_checkpoint), "--dataset", str(eval_files["stage1_2"])])
    assert "not a checkpoint" in err and len(err.strip().splitlines()) == 1

    empty = workdir / "empty.jsonl"
    empty.write_text("\n\n")
    err = fails(["--checkpoint", checkpoint, "--dataset", str(empty)])
    assert "no usable stage1_2 records" in err and len(err.strip().splitlines()) == 1

    err = fails(["--checkpoint", checkpoint, "--dataset", str(workdir / "missing.jsonl")])
    assert "does not exist" in err and len(err.strip().splitlines()) == 1

    bad = workdir / "bad.jsonl"
    good = eval_files["stage1_2"].read_text().splitlines()[0]
    bad.write_text(good + "\n" + json.dumps({"answer": "x", "docs": ["d"]}) + "\nnot json\n")
    err = fails(["--checkpoint", checkpoint, "--dataset", str(bad)])
    assert f"{bad}:2: field 'question'" in err and f"{bad}:3: not valid JSON" in err

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", checkpoint, "--dataset", str(bad), "--batch_size", "0"])
    assert exit_info.value.code == 2
