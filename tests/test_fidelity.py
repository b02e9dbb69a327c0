"""Fidelity to the published method: one default layer band, and the released code's scaling of the alignment term."""

import json

import pytest
import torch

from hf_sara import DEFAULT_LAYERS, PUBLISHED_BAND, SARAConfig, SARATrainer, patch_model, resolve_layers

from .test_distributed import SCRIPT, launch, launch_one_process, model_dir  # noqa: F401 - the fixture
from .testing_utils import LINEAR_STEP, load_pairs, pairs_model, pairs_tokenizer, sara_config, without_anchors


@pytest.mark.parametrize("num_layers", range(1, 129))
def test_every_default_band_is_the_same(num_layers):
    band = resolve_layers(None, num_layers)  # what sara_alignment_loss(layers=None) aligns
    assert resolve_layers(DEFAULT_LAYERS, num_layers) == band
    assert resolve_layers(SARAConfig(output_dir="unused", use_cpu=True).sara_layers, num_layers) == band
    assert resolve_layers(PUBLISHED_BAND, num_layers) == band


def test_the_default_band_is_the_published_one_at_48_layers():
    assert resolve_layers(DEFAULT_LAYERS, 48) == list(range(7, 35))


STEP = {**LINEAR_STEP, "learning_rate": 0.5, "per_device_train_batch_size": 2}


def _router_update(output_dir, **overrides) -> dict[str, torch.Tensor]:
    trainer = SARATrainer(
        model=patch_model(pairs_model()),
        args=sara_config(output_dir, **{**STEP, **overrides}),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )
    routers = {name: p for name, p in trainer.model.named_parameters() if name.endswith("mlp.gate.weight")}
    before = {name: p.detach().clone() for name, p in routers.items()}
    trainer.train()
    return {name: routers[name].detach() - before[name] for name in routers}


@pytest.mark.parametrize("accumulation", [3])
def test_sum_reduction_is_the_accumulation_steps_times_the_mean_on_one_process(tmp_path, accumulation):
    runs = {
        name: _router_update(tmp_path / name, gradient_accumulation_steps=accumulation, **overrides)
        for name, overrides in {
            "sft": dict(sara_weight=0.0),
            "mean": dict(sara_loss_reduction="mean"),
            "sum": dict(sara_loss_reduction="sum"),
        }.items()
    }
    for name, sft in runs["sft"].items():
        mean, summed = runs["mean"][name] - sft, runs["sum"][name] - sft
        assert mean.norm() > 1e-4, "the alignment term must move the router for this test to mean anything"
        torch.testing.assert_close(summed, accumulation * mean, rtol=1e-3, atol=1e-6, msg=name)


def test_sum_reduction_is_accumulation_times_processes_times_the_mean_on_two_processes(model_dir, tmp_path):  # noqa: F811
    updates = {}
    for name, extra in {"sft": ["--sara-weight", "0"], "mean": [], "sum": ["--loss-reduction", "sum"]}.items():
        output_dir = tmp_path / name
        arguments = ["online", "--max-steps", "1", "--gradient-accumulation-steps", "2", "--linear-update", *extra]
        launch("ddp", SCRIPT, str(output_dir), str(model_dir), *arguments)
        rank = json.loads((output_dir / "rank0.json").read_text())
        updates[name] = {key: torch.tensor(value) for key, value in rank["router_weights"].items()}
    for key, sft in updates["sft"].items():
        mean, summed = updates["mean"][key] - sft, updates["sum"][key] - sft
        assert mean.norm() > 1e-4
        torch.testing.assert_close(summed, 2 * 2 * mean, rtol=1e-3, atol=1e-6, msg=key)


def test_an_unknown_loss_reduction_is_refused_naming_the_choices():
    choices = r"\('step_mean', 'mean', 'sum'\)"
    with pytest.raises(ValueError, match=rf"`sara_loss_reduction` must be one of {choices}, got 'total'"):
        SARAConfig(output_dir="unused", use_cpu=True, sara_loss_reduction="total")


def test_the_model_card_records_the_factor_the_sum_reduction_applied(tmp_path):
    trainer = SARATrainer(
        model=patch_model(pairs_model()),
        args=sara_config(tmp_path, **{**STEP, "gradient_accumulation_steps": 3, "sara_loss_reduction": "sum"}),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )
    trainer.create_model_card()
    assert "| sara_loss_reduction | sum: summed over" in (tmp_path / "README.md").read_text()
    assert "(not trained yet)" in (tmp_path / "README.md").read_text()
    trainer.train()
    trainer.create_model_card()
    assert "(x3: effective weight 4.5)" in (tmp_path / "README.md").read_text()


def _alignment_share(output_dir, **overrides) -> dict[str, torch.Tensor]:
    """The alignment term's share of one SGD step's router update, on pairs of which 6 of 16 lack anchors."""
    dataset = without_anchors(load_pairs(), [1, 4, 6, 9, 12, 14])

    def update(name, **extra):
        trainer = SARATrainer(
            model=patch_model(pairs_model()),
            args=sara_config(output_dir / name, **{**STEP, "learning_rate": 1.0, **overrides, **extra}),
            train_dataset=dataset,
            processing_class=pairs_tokenizer(),
        )
        routers = {name: p for name, p in trainer.model.named_parameters() if name.endswith("mlp.gate.weight")}
        before = {name: p.detach().clone() for name, p in routers.items()}
        trainer.train()
        return {name: routers[name].detach() - before[name] for name in routers}

    sara, sft = update("sara"), update("sft", sara_weight=0.0)
    return {name: sara[name] - sft[name] for name in sara}


def test_the_step_mean_is_the_same_however_the_step_is_split(tmp_path):
    # One micro-batch of 8 rows, or 4 accumulated micro-batches of 2: the same 8 rows (5 anchored) in the same order.
    one = _alignment_share(tmp_path / "1x8", per_device_train_batch_size=8, sara_loss_reduction="step_mean")
    four = _alignment_share(
        tmp_path / "4x2", per_device_train_batch_size=2, gradient_accumulation_steps=4, sara_loss_reduction="step_mean"
    )
    for name, update in one.items():
        assert update.norm() > 1e-4
        torch.testing.assert_close(four[name], update, rtol=0, atol=1e-5, msg=name)
    # The micro-batch mean weighs the rows of micro-batches with fewer anchored rows more: here it differs.
    mean = _alignment_share(
        tmp_path / "4x2-mean", per_device_train_batch_size=2, gradient_accumulation_steps=4, sara_loss_reduction="mean"
    )
    assert max((mean[name] - one[name]).norm() / one[name].norm() for name in one) > 0.05


def test_the_step_mean_on_two_processes_is_the_one_process_step_mean(model_dir, tmp_path):  # noqa: F811
    # 2 processes x 2 accumulation steps x 2 rows, and one process with the same 8 rows in one micro-batch: rows
    # without anchors make the micro-batches' anchored counts differ, which the step mean does not depend on.
    common = ["--max-steps", "1", "--linear-update", "--loss-reduction", "step_mean"]
    common += ["--without-anchors", "1,4,6,9,12,14"]
    updates = {}
    for name, weight in {"sara": "1.5", "sft": "0"}.items():
        launch("ddp", SCRIPT, str(tmp_path / f"ddp_{name}"), str(model_dir), "online", *common,
               "--gradient-accumulation-steps", "2", "--sara-weight", weight)  # fmt: skip
        launch_one_process(tmp_path / f"one_{name}", model_dir, *common, "--batch-size", "8",
                           "--gradient-accumulation-steps", "1", "--sara-weight", weight,
                           anchors="online")  # fmt: skip
        for run in ("ddp", "one"):
            rank = json.loads((tmp_path / f"{run}_{name}" / "rank0.json").read_text())
            updates[run, name] = {key: torch.tensor(value) for key, value in rank["router_weights"].items()}
    for key in updates["one", "sara"]:
        one = updates["one", "sara"][key] - updates["one", "sft"][key]
        two = updates["ddp", "sara"][key] - updates["ddp", "sft"][key]
        assert one.norm() > 1e-4
        torch.testing.assert_close(two, one, rtol=0, atol=1e-3 * one.abs().max().item(), msg=key)
