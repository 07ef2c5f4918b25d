"""Units of the trainer's pieces, without a training run: the named step sums and the metrics they give,
the loss terms' weights per stage, the learning-rate multiplier, DeepSpeed's configuration, and
optimizer_step on a real stage-2 model (its sums of the retrieval loss)."""

from __future__ import annotations

import pytest
import torch

from clara.config import TrainConfig
from clara.model.losses import LOSS_TERMS, WEIGHT_SETTINGS, stage_weights
from clara.model.model import StepOutput
from clara.stages import STAGES, get_stage
from clara.training.setup import deepspeed_config, lr_lambda, training_settings
from clara.training.step import SUM_NAMES, DeviceSums, StepSums, micro_batch_sums, optimizer_step, term_means
from tests.evaluation.test_debug import (
    CountingEngine,
    make_batch,
    raw_records,
    records,
    single_process_group,
    stage_model,
)


# -- the step sums, by name -------------------------------------------------------------------------------
def test_every_loss_term_has_a_sum_a_count_a_weight_setting_and_a_metric():
    for term in LOSS_TERMS:
        assert {term.name, f"{term.name}_batches"} <= set(SUM_NAMES)
        assert hasattr(TrainConfig(), term.weight_setting)
    assert len({term.metric for term in LOSS_TERMS}) == len(LOSS_TERMS)
    assert len(set(SUM_NAMES)) == len(SUM_NAMES)


def test_device_sums_add_by_name_and_leave_the_others_at_zero():
    sums = DeviceSums(torch.device("cpu"))
    sums.add(
        {
            "lm_loss": torch.tensor(1.5),
            "tokens": torch.tensor(10),
            "retrieval": torch.tensor(0.25),
            "retrieval_batches": torch.tensor(1.0),
        }
    )
    sums.add({"lm_loss": torch.tensor(0.5), "tokens": torch.tensor(6)})
    added = sums.sums()
    assert (added["lm_loss"], added["tokens"], added["retrieval"], added["retrieval_batches"]) == (2.0, 16.0, 0.25, 1.0)
    assert added["mse"] == 0.0 and added["stop_requests"] == 0.0
    assert set(added.values) == set(SUM_NAMES)
    with pytest.raises(KeyError, match="unknown step sums"):
        sums.add({"lm_los": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="StepSums has no 'lm_los'"):
        _ = added["lm_los"]


def test_the_sums_are_added_in_float64():
    """float32 values summed in float64 give what summing them one by one in float64 gives."""
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.2, 0.3, 1e-8)]
    sums = DeviceSums(torch.device("cpu"))
    for value in values:
        sums.add({"lm_loss": value})
    expected = 0.0
    for value in values:
        expected += float(value.double())
    assert sums.sums()["lm_loss"] == expected


def test_all_reduced_sums_keep_their_names():
    sums = StepSums({name: float(i + 1) for i, name in enumerate(SUM_NAMES)})  # a swap would show
    with single_process_group():
        reduced = sums.all_reduced(torch.device("cpu"))
    assert reduced.values == sums.values


def test_a_micro_batch_adds_its_terms_and_counts_them():
    lm = type(
        "LM",
        (),
        {
            "loss": torch.tensor(2.0),
            "logits": torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
            "targets": torch.tensor([1, 1, 1]),
        },
    )()
    out = StepOutput(loss=torch.tensor(2.5), lm=lm, terms={"mse": torch.tensor(5.0)})
    batch = type("B", (), {"num_tokens": 42})()
    values = {name: float(v) for name, v in micro_batch_sums(batch, out).items()}
    assert values == {
        "lm_loss": 2.0,
        "finite_batches": 1.0,
        "tokens": 42.0,
        "correct_tokens": 2.0,
        "answer_tokens": 3.0,
        "mse": 5.0,
        "mse_batches": 1.0,
    }
    assert out.terms["mse"].item() == 5.0 and "retrieval" not in out.terms


def test_term_means_divide_by_the_micro_batches_that_computed_them():
    sums = StepSums({**dict.fromkeys(SUM_NAMES, 0.0), "mse": 3.0, "mse_batches": 2.0, "finite_batches": 2.0})
    assert term_means(sums, skipped=False) == {"mse_loss": 1.5, "retrieval_loss": None}
    assert term_means(sums, skipped=True) == {"mse_loss": None, "retrieval_loss": None}
    assert list(term_means(sums, skipped=False)) == [term.metric for term in LOSS_TERMS]  # the metrics line's order


# -- loss weights per stage ---------------------------------------------------------------------------------
def test_a_stage_without_a_term_trains_with_its_weight_at_zero():
    cfg = TrainConfig(mse_weight=0.1, retrieval_weight=0.5)
    assert stage_weights(get_stage("stage1"), vars(cfg)) == {"mse_weight": 0.1, "retrieval_weight": 0.0}
    assert stage_weights(get_stage("stage1_2"), vars(cfg)) == {"mse_weight": 0.1, "retrieval_weight": 0.0}
    assert stage_weights(get_stage("stage2"), vars(cfg)) == {"mse_weight": 0.0, "retrieval_weight": 0.5}
    assert set(WEIGHT_SETTINGS) == set(stage_weights(get_stage("stage2"), vars(cfg)))


# -- the learning-rate multiplier -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", list(STAGES))
def test_lr_multiplier_warms_up_and_decays_or_stays_constant(stage):
    cfg = TrainConfig(stage=stage, warmup_ratio=0.1, min_lr_ratio=0.1)
    factor = lr_lambda(training_settings(cfg).schedule, get_stage(stage), total_steps=100)
    if get_stage(stage).constant_schedule:
        assert [factor(step) for step in (0, 10, 99)] == [1.0, 1.0, 1.0]
        return
    assert factor(0) == pytest.approx(0.1)  # warmup of ceil(0.1 * 100) = 10 steps
    assert factor(9) == 1.0
    assert factor(55) == pytest.approx(0.55)
    assert factor(100) == pytest.approx(0.1)


def test_a_short_run_still_warms_up_for_one_step():
    factor = lr_lambda(
        training_settings(TrainConfig(stage="stage1", warmup_ratio=0.01)).schedule, get_stage("stage1"), total_steps=3
    )
    assert factor(0) == 1.0


# -- DeepSpeed's configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage, offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "all")])
def test_deepspeed_config_follows_zero_stage_and_offload(zero_stage, offload):
    cfg = TrainConfig(batch_size=16, micro_batch_size=2, zero_stage=zero_stage, offload=offload)
    config = deepspeed_config(training_settings(cfg).deepspeed, world=2, dtype=torch.bfloat16)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (16, 2)
    assert config["gradient_accumulation_steps"] == 4
    assert config["bf16"] == {"enabled": True} and not config["fp16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage"] == zero_stage
    assert ("offload_optimizer" in zero) == (offload in ("optimizer", "all"))
    assert ("offload_param" in zero) == (offload == "all")
    assert ("stage3_param_persistence_threshold" in zero) == (zero_stage == 3)


def test_fp16_uses_dynamic_loss_scaling():
    config = deepspeed_config(
        training_settings(TrainConfig(batch_size=4, micro_batch_size=4)).deepspeed, world=1, dtype=torch.float16
    )
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0


# -- optimizer_step on a real model -------------------------------------------------------------
def test_optimizer_step_adds_up_the_retrieval_loss_over_the_micro_batches_with_positives():
    stage = "stage2"
    model = stage_model(stage)
    with_positives = records(stage, raw_records(stage)[:4])
    without = [{**r, "has_pos_index": False} for r in with_positives[2:]]
    batches = [make_batch(model, stage, with_positives[:2]), make_batch(model, stage, without)]
    model.eval()  # the expected loss below is computed without dropout
    expected = model(batches[0], retrieval_weight=1.0).terms["retrieval"].item()
    with single_process_group():
        result = optimizer_step(CountingEngine(model, 2), None, batches, [1, 2], retrieval_weight=1.0)
    assert result.sums["retrieval_batches"] == 1  # the micro-batch without pos_index has no retrieval loss
    assert result.sums["retrieval"] == pytest.approx(expected, rel=1e-5)
