"""Routing capture checked family by family against each model's own outputs. `utils/families_table.py` turns the
results of this file into the README's table of verified families."""

import pytest
import torch
from transformers import PreTrainedModel

import hf_sara
from hf_sara import capture_routing, find_routers, patch_model, routing_distributions, sara_alignment_loss
from hf_sara.compat import LATE_ROUTER_DECLARATIONS, is_older_than, late_router_declaration
from hf_sara.routing.families import FAMILIES
from hf_sara.routing.pooling import router_probabilities

from .testing_utils import MODEL_TYPES, NUM_EXPERTS, random_batch, router_parameters, tiny_model


def _reference_distributions(router_logits, scoring, attention_mask):
    """Masked mean of the routers' distributions, computed from `outputs.router_logits` independently of hf_sara."""
    batch_size, seq_len = attention_mask.shape
    mask = attention_mask.float()[..., None]
    pooled = []
    for logits in router_logits:
        logits = logits.float().reshape(batch_size, seq_len, -1)
        if scoring == "softmax":
            probs = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        pooled.append((probs * mask).sum(1) / mask.sum(1))
    return torch.stack(pooled, dim=1)


def _router_logits(model, input_ids, attention_mask):
    """
    The routers' logits as the model returns them (`output_router_logits=True`). Under a transformers release that
    does not record a family's routers yet (see `hf_sara.compat.LATE_ROUTER_DECLARATIONS`), as its router modules
    return them, read with hooks at the index the later release declares.
    """
    late = [late_router_declaration(m) for m in model.modules() if isinstance(m, PreTrainedModel)]
    recorder = next((declaration for declaration in late if declaration is not None), None)
    recorded, handles = [], []
    if recorder is not None:
        for module in model.modules():
            if isinstance(module, recorder.target_class):
                hook = lambda module, args, output: recorded.append(output[recorder.index])  # noqa: E731
                handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    return getattr(outputs, "router_logits", None) or tuple(recorded)


def test_late_router_declarations_are_transformers_own():
    # Where the installed transformers declares the routers itself, it names the table's router class. (Not always at
    # the table's index: GraniteMoE's router returns its logits first from transformers 5.21. On older releases, the
    # index is checked by `test_scoring_rule_matches_router_weights`, which derives the router's own top-k weights from
    # what is captured there.)
    for model_type, (class_name, _, release) in LATE_ROUTER_DECLARATIONS.items():
        if is_older_than("transformers", release):
            continue
        model = tiny_model(model_type)
        backbone = next(m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model)
        declared = backbone._can_record_outputs["router_logits"]
        assert declared.target_class.__name__ == class_name, model_type


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_capture_matches_router_logits(model_type):
    model = tiny_model(model_type)
    input_ids, attention_mask = random_batch()
    router_logits = _router_logits(model, input_ids, attention_mask)
    assert router_logits, f"{model_type} returns no router_logits"
    patch_model(model)
    sites = find_routers(model)
    assert len(sites) == len(router_logits)
    with torch.no_grad(), capture_routing(model, input_ids.shape, attention_mask, keep_scores=True) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask)
    for captured, expected in zip(capture.scores(), router_logits, strict=True):
        torch.testing.assert_close(captured.float(), expected.float().reshape(captured.shape), rtol=0, atol=1e-6)
    expected = _reference_distributions(router_logits, sites[0].scoring, attention_mask)
    torch.testing.assert_close(capture.distributions(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_distributions_sum_to_one(model_type):
    model = patch_model(tiny_model(model_type))
    input_ids, attention_mask = random_batch()
    with torch.no_grad():
        distributions = routing_distributions(model, input_ids, attention_mask)
    assert distributions.dtype == torch.float32
    assert distributions.shape == (input_ids.shape[0], len(find_routers(model)), NUM_EXPERTS)
    torch.testing.assert_close(distributions.sum(-1), torch.ones(distributions.shape[:2]), rtol=0, atol=1e-6)
    assert (distributions >= 0).all()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_scoring_rule_matches_router_weights(model_type):
    """The distribution's ratios between the experts a router chose equal the ratios of the weights it gave them:
    an independent check that the family's scoring function (softmax or sigmoid) is the one hf_sara applies."""
    if not FAMILIES[model_type].weights_follow_scoring:
        pytest.skip(f"{model_type}'s router weights are not ratios of its scores")
    if model_type == "jamba" and is_older_than("transformers", "5.21.0"):
        pytest.skip("Jamba's router is a plain nn.Linear before transformers 5.21.0: no top-k weights to compare with")
    model = patch_model(tiny_model(model_type))
    sites = find_routers(model)
    router = model.get_submodule(sites[-1].name)
    outputs = []
    handle = router.register_forward_hook(lambda module, args, output: outputs.append(output))
    input_ids, attention_mask = random_batch()
    with torch.no_grad(), capture_routing(model, input_ids.shape, attention_mask, keep_scores=True) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask)
    handle.remove()
    output = outputs[0]
    tensors = [t for t in output if isinstance(t, torch.Tensor)] if isinstance(output, tuple) else []
    weights = next((t for t in tensors if t.is_floating_point() and t.shape[-1] < NUM_EXPERTS), None)
    indices = next((t for t in tensors if not t.is_floating_point()), None)
    if weights is None or indices is None or weights.shape[-1] < 2:
        pytest.skip(f"{model_type}'s router returns no top-k weights to compare with")
    probabilities = router_probabilities(capture.scores()[-1], sites[-1].scoring)
    chosen = probabilities.gather(1, indices.reshape(probabilities.shape[0], -1).long())
    weights = weights.float().reshape(chosen.shape)
    torch.testing.assert_close(chosen[:, 1:] / chosen[:, :1], weights[:, 1:] / weights[:, :1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_alignment_gradient_reaches_selected_routers_only(model_type):
    model = patch_model(tiny_model(model_type)).train()
    sites = find_routers(model)
    input_ids, attention_mask = random_batch()
    anchors = torch.full((input_ids.shape[0], len(sites), NUM_EXPERTS), 1.0 / NUM_EXPERTS)
    anchors[:, :, 0] += 0.5
    anchors /= anchors.sum(-1, keepdim=True)

    # Aligning the first MoE layer only: its router gets gradient; routers after it cannot influence it and get none
    # (routers *before* a selected layer legitimately get some, through the expert weighting of the hidden states).
    loss, _ = sara_alignment_loss(routing_distributions(model, input_ids, attention_mask), anchors, layers=[0])
    loss.backward()
    assert loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router_parameters(model, sites[0].name))
    for site in sites[1:]:
        for parameter in router_parameters(model, site.name):
            assert parameter.grad is None or torch.count_nonzero(parameter.grad) == 0, site.name

    model.zero_grad()
    last = len(sites) - 1
    loss, _ = sara_alignment_loss(routing_distributions(model, input_ids, attention_mask), anchors, layers=[last])
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router_parameters(model, sites[last].name))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patching_keeps_outputs_bit_identical(model_type):
    model = tiny_model(model_type)
    input_ids, attention_mask = random_batch()
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        patch_model(model)
        patched = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with capture_routing(model, input_ids.shape, attention_mask):
            captured = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(before, patched)
    assert torch.equal(before, captured)
    hf_sara.unpatch_model(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert not hf_sara.is_patched(model)


def test_the_tested_families_are_the_tables_tested_families():
    assert set(MODEL_TYPES) == {model_type for model_type, facts in FAMILIES.items() if facts.tested}
    assert {facts.scoring for facts in FAMILIES.values()} <= {"softmax", "sigmoid", "probabilities"}


def test_an_unknown_model_type_is_said_out_loud(caplog):
    from transformers.utils import logging as hf_logging

    from hf_sara.routing.families import scoring_function

    config = tiny_model("qwen3_moe").config
    config.model_type = "brand_new_moe"
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            assert scoring_function(config) == "softmax"
    finally:
        hf_logging.disable_propagation()
    assert "model_type 'brand_new_moe' is not in hf_sara's table" in caplog.text
    config.scoring_func = "sigmoid"
    assert scoring_function(config) == "sigmoid"
