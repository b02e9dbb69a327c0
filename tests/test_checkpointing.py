"""Gradient checkpointing: the alignment term trains with the same gradients under no, non-reentrant and reentrant
checkpointing (the deferred route of `capture_routing(gradient="deferred")`); its failure cases raise."""

import gc
import weakref
from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from hf_sara import (
    SARATrainer,
    capture_routing,
    find_routers,
    patch_model,
    router_weight_names,
    routing_distributions,
    sara_alignment_loss,
)
from hf_sara.compat import enable_activation_checkpointing, supports_every_n_layers
from hf_sara.routing.capture import RoutingCapture
from hf_sara.routing.deferred import DeferredAlignment

from .testing_utils import (
    LINEAR_STEP,
    NUM_EXPERTS,
    load_pairs,
    pairs_model,
    pairs_tokenizer,
    random_batch,
    sara_config,
    tiny_model,
    without_anchors,
)

# Softmax with fused 3D experts (qwen3_moe, mixtral), sigmoid-scored with a dense layer before the MoE layers
# (deepseek_v3, glm4_moe), a router with a bias (gpt_oss), dense and MoE layers interleaved (jamba).
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "jamba"]
MODES = [None, "non_reentrant", "reentrant"]
# Every other layer checkpointed: the routers of the others run with autograd in the forward (transformers' other
# option, `offload=True`, needs pinned memory, which a CPU-only torch has not).
VARIANTS = {
    "reentrant_every_2": dict(checkpointing_kwargs={"use_reentrant": True}, every_n_layers=2),
    "non_reentrant_every_2": dict(checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2),
}
WRAPPERS = {"fsdp_wrapper": CheckpointImpl.NO_REENTRANT, "fsdp_wrapper_reentrant": CheckpointImpl.REENTRANT}
HAS_ANCHOR = torch.tensor([True, False, True, True])  # one row without an anchor: masked out of the term


def _batch():
    return random_batch(batch_size=4)


def _anchors(batch_size, num_layers):
    generator = torch.Generator().manual_seed(1)
    return torch.softmax(torch.randn(batch_size, num_layers, NUM_EXPERTS, generator=generator), -1)


def _model(model_type, checkpointing, lora=False):
    torch.manual_seed(0)
    model = tiny_model(model_type).train()
    if lora:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=router_weight_names(model))
        model = get_peft_model(model, config)
        model.enable_input_require_grads()  # what TRL does for PEFT under checkpointing
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0; a non-zero B makes every adapter weight's gradient non-zero
                torch.nn.init.normal_(parameter, std=0.02)
    if checkpointing in WRAPPERS:
        # What FSDP's own activation checkpointing (`fsdp_activation_checkpointing`) applies: torch's checkpoint
        # wrapper around each decoder layer, not transformers' flag.
        layer_class = type(model.get_decoder().layers[0])
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=WRAPPERS[checkpointing]),
            check_fn=lambda module: isinstance(module, layer_class),
        )
    elif checkpointing in VARIANTS:
        enable_activation_checkpointing(model, **VARIANTS[checkpointing])
    elif checkpointing is not None:
        enable_activation_checkpointing(model, {"use_reentrant": checkpointing == "reentrant"})
    return patch_model(model)


def _term_gradients(model_type, checkpointing, gradient="deferred", lora=False, weight=1.7, sft_weight=0.0):
    """Gradients of `sft_weight * L_SFT + weight * term`, the term a masked mean over rows and every MoE layer."""
    model = _model(model_type, checkpointing, lora)
    input_ids, attention_mask = _batch()
    with capture_routing(model, input_ids.shape, attention_mask, gradient=gradient) as capture:
        sft_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False).loss
    layers = list(range(capture.distributions().shape[1]))
    row_weights = HAS_ANCHOR.float() / HAS_ANCHOR.sum() / len(layers)
    anchors = _anchors(input_ids.shape[0], len(layers))
    term, _ = capture.alignment_term(anchors, HAS_ANCHOR, row_weights, layers, ordering=sft_loss)
    (sft_weight * sft_loss + weight * term).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    # torch's checkpoint wrapper inserts a module level: named as without it, to compare with the other modes.
    return {name.replace("_checkpoint_wrapped_module.", ""): g for name, g in gradients.items()}, term.detach()


def _assert_same(got, expected, tolerance=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=tolerance, msg=name)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("checkpointing", MODES)
def test_the_deferred_term_has_the_gradients_of_the_graph_in_every_checkpointing_mode(model_type, checkpointing):
    reference, value = _term_gradients(model_type, None, gradient="graph")
    got, deferred_value = _term_gradients(model_type, checkpointing)
    assert deferred_value == value
    routers = [site.name for site in find_routers(tiny_model(model_type))]
    assert any(name.startswith(routers[0]) and reference[name].abs().sum() > 0 for name in reference)
    # Not only the routers: through the layers' inputs, every earlier layer's weights get the term's gradient.
    first = [name for name in reference if ".layers.0." in name and not any(name.startswith(r) for r in routers)]
    assert first and any(reference[name].abs().sum() > 0 for name in first)
    _assert_same(got, reference)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_torch_checkpoint_wrapper_as_fsdp_applies_it_gets_the_same_gradients(model_type, wrapper):
    reference, _ = _term_gradients(model_type, None, gradient="graph")
    got, _ = _term_gradients(model_type, wrapper)
    _assert_same(got, reference)


@pytest.mark.skipif(not supports_every_n_layers(), reason="checkpointing every n-th layer needs transformers>=5.16.0")
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpointing_every_other_layer_gets_the_same_gradients(variant):
    reference, _ = _term_gradients("qwen3_moe", None, gradient="graph")
    got, _ = _term_gradients("qwen3_moe", variant)
    _assert_same(got, reference)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_the_graph_term_has_the_same_gradients_under_non_reentrant_checkpointing(model_type):
    # The building block without the deferred route: a loss on `capture.distributions()` (non-reentrant only).
    reference, _ = _term_gradients(model_type, None, gradient="graph")
    got, _ = _term_gradients(model_type, "non_reentrant", gradient="graph")
    _assert_same(got, reference, tolerance=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("checkpointing", MODES)
def test_lora_on_attention_and_routers_gets_the_same_gradients(model_type, checkpointing):
    reference, _ = _term_gradients(model_type, None, gradient="graph", lora=True)
    got, _ = _term_gradients(model_type, checkpointing, lora=True)
    assert any("lora_" in name and "gate" in name or "router" in name for name in got)
    assert all("lora_" in name for name in got)
    assert all(reference[name].abs().sum() > 0 for name in reference if "lora_B" in name)
    _assert_same(got, reference)


@pytest.mark.parametrize("checkpointing", MODES)
def test_the_sft_loss_keeps_its_own_gradients(checkpointing):
    both, _ = _term_gradients("qwen3_moe", checkpointing, sft_weight=1.0)
    sft_only, _ = _term_gradients("qwen3_moe", checkpointing, sft_weight=1.0, weight=0.0)
    term_only, _ = _term_gradients("qwen3_moe", checkpointing)
    _assert_same(both, {name: sft_only[name] + term_only.get(name, 0) for name in sft_only}, tolerance=1e-6)


class TestFailures:
    def test_a_backward_that_leaves_the_term_out_raises(self):
        model = _model("qwen3_moe", "non_reentrant")
        input_ids, attention_mask = _batch()
        with capture_routing(model, input_ids.shape, attention_mask, gradient="deferred") as capture:
            sft_loss = model(
                input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False
            ).loss
        layers = list(range(4))
        capture.alignment_term(_anchors(4, 4), HAS_ANCHOR, HAS_ANCHOR.float() / 12, layers, ordering=sft_loss)
        with pytest.raises(RuntimeError, match="before the SARA alignment term had its coefficient"):
            sft_loss.backward()  # the term was built, but the loss backpropagated is another one

    def test_a_second_backward_raises(self):
        model = _model("qwen3_moe", "reentrant")
        input_ids, attention_mask = _batch()
        with capture_routing(model, input_ids.shape, attention_mask, gradient="deferred") as capture:
            sft_loss = model(
                input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False
            ).loss
        term, _ = capture.alignment_term(_anchors(4, 4), HAS_ANCHOR, HAS_ANCHOR.float() / 12, [0, 1, 2, 3], sft_loss)
        loss = sft_loss + term
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backpropagated a second time"):
            loss.backward()

    def test_a_router_the_backward_never_recomputes_raises(self):
        # LoRA on the routers and the LM head, the inputs' gradients off: no input of a checkpointed layer requires
        # grad, so reentrant checkpointing never recomputes the layers, and the routers would train nothing.
        torch.manual_seed(0)
        model = tiny_model("qwen3_moe").train()
        config = LoraConfig(r=4, target_modules=["lm_head"], target_parameters=["mlp.gate.weight"])
        model = get_peft_model(model, config)
        enable_activation_checkpointing(model, {"use_reentrant": True})
        model.disable_input_require_grads()  # PEFT enables them with checkpointing; a model that lacks them
        model = patch_model(model)
        input_ids, attention_mask = _batch()
        with capture_routing(model, input_ids.shape, attention_mask, gradient="deferred") as capture:
            sft_loss = model(
                input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False
            ).loss
        term, _ = capture.alignment_term(_anchors(4, 4), HAS_ANCHOR, HAS_ANCHOR.float() / 12, [0, 1, 2, 3], sft_loss)
        with pytest.raises(RuntimeError, match="never reached 4 aligned router"):
            (sft_loss + term).backward()

    def test_the_deferred_term_needs_the_loss_it_joins(self):
        model = _model("qwen3_moe", "reentrant")
        input_ids, attention_mask = _batch()
        with capture_routing(model, input_ids.shape, attention_mask, gradient="deferred") as capture:
            model(input_ids=input_ids, attention_mask=attention_mask)
        with pytest.raises(ValueError, match="needs `ordering`"):
            capture.alignment_term(_anchors(4, 4), HAS_ANCHOR, HAS_ANCHOR.float() / 12, [0, 1, 2, 3])

    def test_a_loss_on_the_graph_distributions_is_still_refused_under_reentrant_checkpointing(self):
        model = _model("qwen3_moe", "reentrant")
        input_ids, attention_mask = _batch()
        with pytest.raises(RuntimeError, match=r"use_reentrant=True.*gradient='deferred'.*'use_reentrant': False"):
            routing_distributions(model, input_ids, attention_mask)


def test_recomputation_fires_hooks_but_records_nothing():
    model = patch_model(tiny_model("qwen3_moe")).train()
    enable_activation_checkpointing(model, {"use_reentrant": False})
    sites = find_routers(model)
    fired = []
    for site in sites:
        model.get_submodule(site.name).register_forward_hook(lambda *args: fired.append(1))
    input_ids, attention_mask = _batch()
    distributions = routing_distributions(model, input_ids, attention_mask)
    assert len(fired) == len(sites)
    loss, _ = sara_alignment_loss(distributions, _anchors(input_ids.shape[0], len(sites)), layers="all")
    loss.backward()  # recomputes each checkpointed layer: its router runs again, outside the capture
    assert len(fired) == 2 * len(sites)


def _live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.parametrize("gradient", ["graph", "deferred"])
def test_captures_do_not_leak_over_training_steps(gradient):
    model = patch_model(tiny_model("qwen3_moe")).train()
    enable_activation_checkpointing(model, {"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids, attention_mask = _batch()
    anchors = _anchors(input_ids.shape[0], 4)
    captures, records = [], []
    original_init, original_record_init = RoutingCapture.__init__, DeferredAlignment.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        captures.append(weakref.ref(self))

    def tracking_record_init(self, *args, **kwargs):
        original_record_init(self, *args, **kwargs)
        records.append(weakref.ref(self))

    RoutingCapture.__init__, DeferredAlignment.__init__ = tracking_init, tracking_record_init
    try:
        counts = []
        for step in range(50):
            with capture_routing(model, input_ids.shape, attention_mask, gradient=gradient) as capture:
                sft = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
            loss, _ = capture.alignment_term(anchors, HAS_ANCHOR, HAS_ANCHOR.float() / 12, [0, 1, 2, 3], sft)
            (sft + loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del capture, sft, loss
            if step in (4, 49):
                counts.append(_live_tensors())
    finally:
        RoutingCapture.__init__, DeferredAlignment.__init__ = original_init, original_record_init
    gc.collect()
    assert len(captures) == 50 and len(records) == (50 if gradient == "deferred" else 0)
    assert all(ref() is None for ref in captures + records)
    assert counts[1] <= counts[0]


# SARATrainer under each checkpointing mode: one SGD step without clipping, so the update is linear in the gradient and
# the alignment term's share of it is the difference with a run of weight 0.

STEP = dict(**LINEAR_STEP, per_device_train_batch_size=2, gradient_accumulation_steps=2)
CHECKPOINTING = {
    "none": {},
    "non_reentrant": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
    "reentrant": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
}


def _family_model(model_type: str):
    tokenizer = pairs_tokenizer()
    sizes = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tiny_model(model_type, **sizes).train()


def _update(output_dir, lora: bool, model_type: str = "qwen3_moe", **overrides) -> dict[str, torch.Tensor]:
    model = pairs_model() if model_type == "qwen3_moe" else _family_model(model_type)
    peft_config = None
    if lora:
        peft_config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], target_parameters=router_weight_names(model)
        )
    trainer = SARATrainer(
        model=model,
        args=sara_config(output_dir, **{**STEP, **overrides}),
        train_dataset=without_anchors(load_pairs(), [1, 4, 6, 9, 12, 14]),
        processing_class=pairs_tokenizer(),
        peft_config=peft_config,
    )
    if lora:  # a non-zero B, so that every adapter weight's gradient is non-zero
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(0))
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    trainer.train()
    return {name: p.detach() - before[name] for name, p in trainable.items()}


def _alignment_update(output_dir, lora: bool, model_type: str = "qwen3_moe", **overrides) -> dict[str, torch.Tensor]:
    with_term = _update(output_dir / "sara", lora, model_type, **overrides)
    without = _update(
        output_dir / "sft", lora, model_type, **{**overrides, "sara_weight": 0.0, "anchor_sft_weight": 0.0}
    )
    return {name: with_term[name] - without[name] for name in with_term}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("reduction", ["mean", "step_mean", "sum"])
def test_the_trainer_gets_the_same_alignment_update_in_every_checkpointing_mode(tmp_path, reduction, lora):
    updates = {
        mode: _alignment_update(tmp_path / mode, lora, sara_loss_reduction=reduction, **arguments)
        for mode, arguments in CHECKPOINTING.items()
    }
    reference = updates.pop("none")
    assert max(update.norm() for update in reference.values()) > 1e-4, "the term must move the weights"
    if lora:
        assert all(update.norm() > 0 for name, update in reference.items() if "gate" in name)
    for mode, update in updates.items():
        for name in reference:
            torch.testing.assert_close(update[name], reference[name], rtol=0, atol=1e-6, msg=f"{mode}: {name}")


# Sigmoid-scored with a dense first layer (deepseek_v3), fused 3D experts (mixtral), a router with a bias (gpt_oss),
# dense and MoE layers interleaved (jamba): the trainer's alignment update under reentrant checkpointing, with
# accumulation, equals the one without checkpointing.
@pytest.mark.parametrize("model_type", ["deepseek_v3", "mixtral", "gpt_oss", "jamba"])
def test_the_trainer_gets_the_same_alignment_update_with_reentrant_checkpointing_on_other_families(
    tmp_path, model_type
):
    reference = _alignment_update(tmp_path / "none", False, model_type)
    update = _alignment_update(tmp_path / "reentrant", False, model_type, **CHECKPOINTING["reentrant"])
    assert max(change.norm() for change in reference.values()) > 1e-4, "the term must move the weights"
    for name in reference:
        torch.testing.assert_close(update[name], reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("anchor_mode", ["offline", "online"])
def test_an_sft_loss_on_the_anchors_trains_alike_in_every_checkpointing_mode(tmp_path, anchor_mode):
    updates = {
        mode: _alignment_update(
            tmp_path / mode, False, anchor_sft_weight=1.0, sara_anchor_mode=anchor_mode, **arguments
        )
        for mode, arguments in CHECKPOINTING.items()
    }
    reference = updates.pop("none")
    for mode, update in updates.items():
        for name in reference:
            torch.testing.assert_close(update[name], reference[name], rtol=0, atol=1e-6, msg=f"{mode}: {name}")
