"""Recomputing router logits in backward: same gradients as keeping the probabilities, nothing kept per token."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_sara.routing.capture as capture_module
from hf_sara import capture_routing, patch_model
from hf_sara.compat import enable_activation_checkpointing
from hf_sara.routing.capture import activation_checkpointing
from hf_sara.routing.patching import RouterHook

from .testing_utils import MODEL_TYPES, NUM_EXPERTS, random_batch, tiny_model

# Routers whose module has no `weight` of its own (the linear layer sits inside): these keep the probabilities.
NOT_RECOMPUTED = {"hunyuan_v1_moe"}


def _router_hooks(model):
    return [
        hook for module in model.modules() for hook in module._forward_hooks.values() if isinstance(hook, RouterHook)
    ]


def _gradients(model, recompute, seq_len=9):
    input_ids, attention_mask = random_batch(seq_len=seq_len)
    attention_mask[0, -3:] = 0
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same draws for routers with training noise (PhiMoE's sparse mixer, jitter)
    with capture_routing(model, input_ids.shape, attention_mask, recompute_router_logits=recompute) as capture:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    distributions = capture.distributions()
    target = torch.softmax(torch.randn(distributions.shape, generator=torch.Generator().manual_seed(1)), -1)
    ((distributions - target) ** 2).sum().backward()
    return distributions.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_same_gradients_as_keeping_the_probabilities(model_type):
    model = patch_model(tiny_model(model_type)).train()
    kept, kept_grads = _gradients(model, recompute=False)
    recomputed, recomputed_grads = _gradients(model, recompute=True)
    torch.testing.assert_close(recomputed, kept, rtol=0, atol=0)
    assert recomputed_grads.keys() == kept_grads.keys() and kept_grads
    for name, grad in kept_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    recomputing = {hook.linear_router for hook in _router_hooks(model)}
    assert recomputing == ({None} if model_type in NOT_RECOMPUTED else {True})


class _SavedStorages:
    def __init__(self):
        self.sizes = {}

    def pack(self, tensor):
        self.sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor


def _kept_by_the_pooling(model, recompute, seq_len):
    """Bytes the pooling saves for backward that the model's own forward does not save already."""
    model_saved, pooling_saved = _SavedStorages(), _SavedStorages()
    input_ids, attention_mask = random_batch(batch_size=2, seq_len=seq_len)
    original = capture_module._identity
    capture_module._identity = pooling_saved.pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(model_saved.pack, lambda tensor: tensor):
            with capture_routing(model, input_ids.shape, attention_mask, recompute_router_logits=recompute) as capture:
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        capture_module._identity = original
    shared = model_saved.sizes.keys() | {p.untyped_storage().data_ptr() for p in model.parameters()}
    extra = {ptr: size for ptr, size in pooling_saved.sizes.items() if ptr not in shared}
    del outputs, capture
    return sum(extra.values())


def test_nothing_kept_per_token():
    model = patch_model(tiny_model("qwen3_moe")).train()
    kept = {seq_len: _kept_by_the_pooling(model, False, seq_len) for seq_len in (16, 64)}
    recomputed = {seq_len: _kept_by_the_pooling(model, True, seq_len) for seq_len in (16, 64)}
    # Keeping the probabilities saves fp32 [tokens, experts] per layer (4 layers, batch 2), plus small indices.
    assert kept[64] - kept[16] >= 4 * 2 * 48 * NUM_EXPERTS * 4
    # Recomputing saves nothing the model does not keep already: the router's input and weight.
    assert recomputed == {16: 0, 64: 0}


def test_fallback_routers_recompute_with_the_same_gradients():
    model = tiny_model("qwen3_moe")
    model.model._can_record_outputs = {}
    model._can_record_outputs = {}
    model = patch_model(model).train()
    _, kept = _gradients(model, recompute=False)
    _, recomputed = _gradients(model, recompute=True)
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "adapter",
    [
        dict(target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight"]),
        dict(target_modules=["q_proj"]),
    ],
    ids=["lora-on-router", "frozen-router"],
)
def test_adapters_get_the_same_gradients(adapter):
    model = get_peft_model(tiny_model("qwen3_moe"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **adapter))
    model = patch_model(model).train()
    _, kept = _gradients(model, recompute=False)
    _, recomputed = _gradients(model, recompute=True)
    assert kept.keys() == recomputed.keys() and kept
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_default_follows_activation_checkpointing():
    model = patch_model(tiny_model("qwen3_moe")).train()
    input_ids, attention_mask = random_batch()
    assert not activation_checkpointing(model)
    with capture_routing(model, input_ids.shape, attention_mask) as capture:
        assert capture.recompute_router_logits
    enable_activation_checkpointing(model, {"use_reentrant": False})
    assert activation_checkpointing(model)
    with capture_routing(model, input_ids.shape, attention_mask) as capture:
        assert not capture.recompute_router_logits
    assert not activation_checkpointing(model.eval())
    with torch.no_grad(), capture_routing(model, input_ids.shape, attention_mask) as capture:
        assert not capture.recompute_router_logits
