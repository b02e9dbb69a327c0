"""Fidelity to the published method: one default layer band, and the released code's scaling of the alignment term."""

import json

import pytest
import torch

from hf_sara import DEFAULT_LAYERS, PUBLISHED_BAND, SARAConfig, SARATrainer, patch_model, resolve_layers

from .test_distributed import SCRIPT, launch, model_dir  # noqa: F401 - the fixture
from .testing_utils import load_pairs, pairs_model, pairs_tokenizer, sara_config


@pytest.mark.parametrize("num_layers", range(1, 129))
def test_every_default_band_is_the_same(num_layers):
    band = resolve_layers(None, num_layers)  # what sara_alignment_loss(layers=None) aligns
    assert resolve_layers(DEFAULT_LAYERS, num_layers) == band
    assert resolve_layers(SARAConfig(output_dir="unused", use_cpu=True).sara_layers, num_layers) == band
    assert resolve_layers(PUBLISHED_BAND, num_layers) == band


def test_the_default_band_is_the_published_one_at_48_layers():
    assert resolve_layers(DEFAULT_LAYERS, 48) == list(range(7, 35))


# One SGD step (no clipping, constant rate): the update is linear in the gradient, so the alignment term's share of
# the router update is the difference with a weight-0 run.
STEP = dict(
    max_steps=1,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    per_device_train_batch_size=2,
)


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
    with pytest.raises(ValueError, match=r"`sara_loss_reduction` must be one of \('mean', 'sum'\), got 'total'"):
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
