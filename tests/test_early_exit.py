"""Forwards that need only the routing up to a layer end after its router: the anchors' (offline and online), the
routing callback's; the rest of the model is not run, and the routing up to that layer is the full forward's."""

import os

import pytest
import torch

import hf_sara.routing.capture as capture_module
from hf_sara import RoutingDivergenceCallback, SARATrainer, capture_routing, patch_model, routing_distributions
from hf_sara.training.anchors import ANCHORS_FILE_NAME

from .testing_utils import load_pairs, pairs_model, pairs_tokenizer, random_batch, sara_config, tiny_model


def _count_forwards(module: torch.nn.Module) -> list[int]:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "jamba", "gpt_oss"])
def test_the_forward_ends_after_the_layer_and_its_routing_is_the_full_forwards(model_type):
    model = patch_model(tiny_model(model_type)).eval()
    input_ids, attention_mask = random_batch(batch_size=4)
    lm_head_calls = _count_forwards(model.lm_head)
    with torch.no_grad():
        full = routing_distributions(model, input_ids, attention_mask)
        with capture_routing(model, input_ids.shape, attention_mask, stop_after=1) as capture:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    assert capture.stopped_early and len(lm_head_calls) == 1  # the full forward's only
    torch.testing.assert_close(capture.distributions(), full[:, :2], rtol=0, atol=0)


def test_a_forward_with_gradient_runs_to_its_end():
    model = patch_model(tiny_model("qwen3_moe")).train()
    input_ids, attention_mask = random_batch(batch_size=4)
    with capture_routing(model, input_ids.shape, attention_mask, stop_after=1) as capture:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    assert not capture.stopped_early and loss.requires_grad
    assert capture.distributions().shape[1] == 2  # cut the same way


def test_sharded_weights_run_the_whole_forward(monkeypatch):
    # FSDP and ZeRO-3 gather and release parameters around each module: their forward is never cut short.
    monkeypatch.setattr(capture_module, "has_sharded_parameters", lambda model: True)
    model = patch_model(tiny_model("qwen3_moe")).eval()
    input_ids, attention_mask = random_batch(batch_size=4)
    lm_head_calls = _count_forwards(model.lm_head)
    with torch.no_grad(), capture_routing(model, input_ids.shape, attention_mask, stop_after=1) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    assert not capture.stopped_early and len(lm_head_calls) == 1
    assert capture.distributions().shape[1] == 2


def test_a_layer_that_is_not_captured_is_refused():
    model = patch_model(tiny_model("qwen3_moe"))
    with pytest.raises(ValueError, match=r"`stop_after` must be a captured layer, 0..3: 4"):
        with capture_routing(model, (1, 3), stop_after=4):
            pass


def _trainer(tmp_path, **overrides):
    return SARATrainer(
        model=pairs_model(),
        args=sara_config(tmp_path, **{"max_steps": 1, "sara_layers": "0-1", **overrides}),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )


def test_offline_anchors_hold_the_layers_up_to_the_last_aligned_one(tmp_path):
    trainer = _trainer(tmp_path)
    last_router_calls = _count_forwards(trainer.model.model.layers[3].mlp.gate)
    table = trainer.train_anchor_table()
    assert table.shape == (16, 2, 8) and not last_router_calls  # the anchors' forwards ended at layer 1
    metadata = trainer.offline_anchors.file.metadata
    assert metadata["computed_layers"] == "2" and metadata["num_moe_layers"] == "4"
    full = patch_model(pairs_model()).eval()
    row = load_pairs()[0]
    tokenizer = pairs_tokenizer()
    ids = tokenizer(row["anchor_prompt"] + row["anchor_completion"] + tokenizer.eos_token, return_tensors="pt")
    with torch.no_grad():
        expected = routing_distributions(full, ids.input_ids)[0]
    torch.testing.assert_close(table[0], expected[:2], rtol=0, atol=1e-6)
    trainer.train()  # looked up: zeros beyond layer 1, which the loss does not read
    assert trainer.state.log_history[0]["sara/js"] > 0


def test_a_file_for_fewer_layers_is_reused_for_as_many_and_refused_for_more(tmp_path):
    _trainer(tmp_path).prepare_offline_anchors()
    path = tmp_path / ANCHORS_FILE_NAME
    written = os.path.getmtime(path)
    _trainer(tmp_path, sara_layers="1").train()  # layers 0..1 held: layer 1 is there
    with pytest.raises(ValueError, match=r"hold MoE layers 0\.\.1, and this run aligns layers up to 3"):
        _trainer(tmp_path, sara_layers="all").train()
    assert os.path.getmtime(path) == written


def test_online_anchors_end_after_the_last_aligned_layer(tmp_path):
    trainer = _trainer(tmp_path, sara_anchor_mode="online", max_steps=2)
    last_router_calls = _count_forwards(trainer.model.model.layers[3].mlp.gate)
    trainer.train()
    # Layer 3's router runs in each step's training forward (1 per step), never in the anchors' forwards.
    assert len(last_router_calls) == 2
    assert all(entry["sara/js"] > 0 for entry in trainer.state.log_history if "sara/js" in entry)


def test_the_callback_measures_up_to_the_last_aligned_layer_unless_asked_for_every_layer(tmp_path):
    held_out = load_pairs().select(range(6))
    trainer = _trainer(tmp_path, sara_layers="0-1", max_steps=1)
    band = RoutingDivergenceCallback(trainer, held_out, plot=False)
    every = RoutingDivergenceCallback(trainer, held_out, plot=False, every_layer=True)
    band_report, every_report = band.measure(), every.measure()
    for language, values in band_report.divergence.items():
        assert values.shape == (2,)
        torch.testing.assert_close(values, every_report.divergence[language][:2], rtol=0, atol=0)
    assert {key for key in band.metrics(band_report) if "_layer" in key} == {
        f"routing/js_{language}_layer{layer}" for language in band_report.divergence for layer in (0, 1)
    }
    assert band.metrics(band_report)["routing/js_sw"] == every.metrics(every_report)["routing/js_sw"]
