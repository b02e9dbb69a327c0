"""Gradient checkpointing: the alignment gradient is the same with it off and non-reentrant; reentrant is refused."""

import gc
import weakref

import pytest
import torch

from hf_sara import capture_routing, find_routers, patch_model, routing_distributions, sara_alignment_loss
from hf_sara.routing.capture import RoutingCapture

from .testing_utils import NUM_EXPERTS, random_batch, tiny_model

CHECKPOINTED_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def _anchors(batch_size, num_layers):
    generator = torch.Generator().manual_seed(1)
    return torch.softmax(torch.randn(batch_size, num_layers, NUM_EXPERTS, generator=generator), -1)


def _alignment_gradients(model_type, checkpointing):
    model = patch_model(tiny_model(model_type)).train()
    if checkpointing is not None:
        model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    input_ids, attention_mask = random_batch()
    # One forward gives both losses, as in training: the SFT loss and the pooled routing of the same tokens.
    with capture_routing(model, input_ids.shape, attention_mask) as capture:
        sft_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    distributions = capture.distributions()
    alignment_loss, _ = sara_alignment_loss(distributions, _anchors(*distributions.shape[:2]), layers="all")
    (sft_loss + alignment_loss).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", CHECKPOINTED_FAMILIES)
def test_non_reentrant_checkpointing_gives_the_same_gradients(model_type):
    plain = _alignment_gradients(model_type, None)
    checkpointed = _alignment_gradients(model_type, "non_reentrant")
    assert plain.keys() == checkpointed.keys()
    routers = [site.name for site in find_routers(tiny_model(model_type))]
    assert any(name.startswith(routers[0]) and plain[name].abs().sum() > 0 for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", CHECKPOINTED_FAMILIES)
def test_reentrant_checkpointing_is_refused_with_the_fix(model_type):
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*'use_reentrant': False"):
        _alignment_gradients(model_type, "reentrant")


def test_recomputation_fires_hooks_but_records_nothing():
    model = patch_model(tiny_model("qwen3_moe")).train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    sites = find_routers(model)
    fired = []
    for site in sites:
        model.get_submodule(site.name).register_forward_hook(lambda *args: fired.append(1))
    input_ids, attention_mask = random_batch()
    distributions = routing_distributions(model, input_ids, attention_mask)
    assert len(fired) == len(sites)
    loss, _ = sara_alignment_loss(distributions, _anchors(input_ids.shape[0], len(sites)), layers="all")
    loss.backward()  # recomputes each checkpointed layer: its router runs again, outside the capture
    assert len(fired) == 2 * len(sites)


def _live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_captures_do_not_leak_over_training_steps():
    model = patch_model(tiny_model("qwen3_moe")).train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids, attention_mask = random_batch()
    anchors = _anchors(input_ids.shape[0], 4)
    captures = []
    original_init = RoutingCapture.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        captures.append(weakref.ref(self))

    RoutingCapture.__init__ = tracking_init
    try:
        counts = []
        for step in range(50):
            distributions = routing_distributions(model, input_ids, attention_mask)
            sft = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
            loss, _ = sara_alignment_loss(distributions, anchors, layers="all")
            (sft + loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del distributions, sft, loss
            if step in (4, 49):
                counts.append(_live_tensors())
    finally:
        RoutingCapture.__init__ = original_init
    gc.collect()
    assert len(captures) == 50
    assert all(ref() is None for ref in captures)
    assert counts[1] <= counts[0]
