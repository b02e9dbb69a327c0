import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

import hf_sara
from hf_sara import (
    capture_routing,
    find_routers,
    is_patched,
    patch_model,
    routing_distributions,
    sara_alignment_loss,
    unpatch_model,
)
from hf_sara.routing.patching import STATE_ATTRIBUTE, RouterHook

from .testing_utils import NUM_EXPERTS, random_batch, tiny_model


def _reference(model, input_ids, attention_mask):
    """Masked mean of the softmax of the model's own `outputs.router_logits`."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).router_logits
    mask = attention_mask.float()[..., None]
    probs = [torch.softmax(x.float(), -1).reshape(*input_ids.shape, -1) for x in logits]
    return torch.stack([(p * mask).sum(1) / mask.sum(1) for p in probs], dim=1)


def _our_hooks(model):
    return [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, RouterHook)]


class TestPatchModel:
    def test_returns_the_model_and_is_idempotent(self):
        model = tiny_model("qwen3_moe")
        assert patch_model(model) is model
        state = getattr(model, STATE_ATTRIBUTE)
        assert patch_model(model) is model
        assert getattr(model, STATE_ATTRIBUTE) is state
        assert len(_our_hooks(model)) == 4

    def test_repatching_with_other_layers_replaces_the_hooks(self):
        model = patch_model(tiny_model("qwen3_moe"))
        patch_model(model, layers=[1, 3])
        assert len(_our_hooks(model)) == 2
        input_ids, attention_mask = random_batch()
        with torch.no_grad():
            distributions = routing_distributions(model, input_ids, attention_mask)
        torch.testing.assert_close(distributions, _reference(model, input_ids, attention_mask)[:, [1, 3]])

    def test_unpatch_restores_the_model_exactly(self):
        model = tiny_model("mixtral")
        hooks_before = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
        attributes_before = {name: set(vars(m)) for name, m in model.named_modules()}
        unpatch_model(patch_model(model))
        assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
        assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes_before
        assert not is_patched(model)

    def test_deep_copy_of_a_patched_model_captures_its_own_routing(self):
        model = patch_model(tiny_model("qwen3_moe"))
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            copy_.model.layers[0].mlp.gate.weight.mul_(3.0)  # the copy now routes differently
        input_ids, attention_mask = random_batch()
        with torch.no_grad():
            torch.testing.assert_close(
                routing_distributions(copy_, input_ids, attention_mask), _reference(copy_, input_ids, attention_mask)
            )
            torch.testing.assert_close(
                routing_distributions(model, input_ids, attention_mask), _reference(model, input_ids, attention_mask)
            )

    def test_dense_model_is_refused_with_its_class_name(self, monkeypatch):
        warnings = []
        monkeypatch.setattr("hf_sara.routing.families.logger.warning_once", warnings.append)
        config = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        with pytest.raises(ValueError, match=r"LlamaForCausalLM has no Mixture-of-Experts router.*router_logits"):
            patch_model(LlamaForCausalLM(config))
        assert warnings == []  # was: first a warning that the scoring function of 'llama' is not in the table

    def test_capture_requires_patching(self):
        model = tiny_model("qwen3_moe")
        input_ids, attention_mask = random_batch()
        with pytest.raises(ValueError, match="call `model = hf_sara.patch_model"):
            routing_distributions(model, input_ids, attention_mask)

    def test_fallback_finds_undeclared_routers(self):
        """A model that declares no router (as remote code does) is handled by the name-and-width fallback, which
        recomputes the logits from the router's input and gives the same distributions as the declared path."""
        model = tiny_model("qwen3_moe")
        input_ids, attention_mask = random_batch()
        expected = _reference(model, input_ids, attention_mask)
        model.model._can_record_outputs = {}  # instance attribute: hide the declaration
        model._can_record_outputs = {}
        patch_model(model)
        sites = find_routers(model)
        assert [site.source for site in sites] == ["fallback"] * 4
        assert [site.decoder_layer for site in sites] == [0, 1, 2, 3]
        with torch.no_grad():
            torch.testing.assert_close(routing_distributions(model, input_ids, attention_mask), expected)

    def test_router_that_never_runs_is_reported(self):
        model = patch_model(tiny_model("qwen3_moe"))
        input_ids, attention_mask = random_batch()
        model.model.layers[2].mlp.gate._forward_hooks.clear()  # as if a hub kernel replaced the MoE block
        with pytest.raises(RuntimeError, match="1 of 4 hooked routers did not run.*use_kernels"):
            routing_distributions(model, input_ids, attention_mask)

    def test_composite_model_language_model_is_found(self):
        text = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        )
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32)
        config = Qwen3VLMoeConfig(
            text_config=text,
            vision_config={**vision, "deepstack_visual_indexes": [0]},
            image_token_id=5,
            video_token_id=6,
            vision_start_token_id=7,
        )
        torch.manual_seed(0)
        model = patch_model(Qwen3VLMoeForConditionalGeneration(config).eval())
        assert [site.name for site in find_routers(model)] == [
            "model.language_model.layers.0.mlp.gate",
            "model.language_model.layers.1.mlp.gate",
        ]
        input_ids, attention_mask = random_batch()
        with torch.no_grad():
            torch.testing.assert_close(
                routing_distributions(model, input_ids, attention_mask), _reference(model, input_ids, attention_mask)
            )


class TestDtypes:
    def test_bf16_model_gives_fp32_distributions(self):
        model = patch_model(tiny_model("qwen3_moe"))
        input_ids, attention_mask = random_batch()
        with torch.no_grad():
            fp32 = routing_distributions(model, input_ids, attention_mask)
            bf16 = routing_distributions(model.to(torch.bfloat16), input_ids, attention_mask)
        assert bf16.dtype == torch.float32
        torch.testing.assert_close(bf16.sum(-1), torch.ones(bf16.shape[:2]), rtol=0, atol=1e-6)
        torch.testing.assert_close(bf16, fp32, rtol=0, atol=2e-2)


class TestPackedBatches:
    def test_padding_free_batch_gives_one_distribution_per_sequence(self):
        model = patch_model(tiny_model("qwen3_moe"))
        input_ids, attention_mask = random_batch(batch_size=3, seq_len=9)
        lengths = attention_mask.sum(1).tolist()
        packed = torch.cat([input_ids[row, :length] for row, length in enumerate(lengths)])[None]
        position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
        with torch.no_grad():
            padded = routing_distributions(model, input_ids, attention_mask)
            unpadded = routing_distributions(model, packed, position_ids=position_ids)
        assert unpadded.shape == padded.shape
        torch.testing.assert_close(unpadded, padded, rtol=0, atol=1e-5)

    def test_token_mask_restricts_pooling(self):
        model = patch_model(tiny_model("qwen3_moe"))
        input_ids, attention_mask = random_batch()
        token_mask = torch.zeros_like(attention_mask)
        token_mask[:, :3] = 1
        with torch.no_grad():
            with capture_routing(model, input_ids.shape, attention_mask, keep_scores=True) as capture:
                model(input_ids=input_ids, attention_mask=attention_mask)
            masked = routing_distributions(model, input_ids, attention_mask, token_mask=token_mask)
        per_token = torch.softmax(capture.scores()[0].reshape(*input_ids.shape, -1), -1)
        torch.testing.assert_close(masked[:, 0], per_token[:, :3].mean(1))

    def test_empty_row_is_refused(self):
        model = patch_model(tiny_model("qwen3_moe"))
        input_ids, attention_mask = random_batch()
        attention_mask[1] = 0
        with pytest.raises(ValueError, match=r"Row\(s\) \[1\] of the batch have no token to pool"):
            routing_distributions(model, input_ids, attention_mask)


class TestPeft:
    @pytest.mark.parametrize(
        "adapter",
        [
            dict(target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight"]),
            dict(target_modules=["q_proj", "v_proj"], modules_to_save=["gate"]),
        ],
        ids=["lora-router-weight", "modules-to-save-router"],
    )
    @pytest.mark.parametrize("patch_before_wrapping", [False, True])
    def test_hooks_fire_with_adapter_and_router_gets_gradient(self, adapter, patch_before_wrapping):
        model = tiny_model("qwen3_moe")
        if patch_before_wrapping:
            patch_model(model)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **adapter)
        model = patch_model(get_peft_model(model, config))
        # The adapter changes the routing (non-zero LoRA init): the capture must see the adapted router.
        input_ids, attention_mask = random_batch()
        with torch.no_grad():
            torch.testing.assert_close(
                routing_distributions(model, input_ids, attention_mask), _reference(model, input_ids, attention_mask)
            )
        model.train()
        distributions = routing_distributions(model, input_ids, attention_mask)
        anchors = torch.full_like(distributions, 1.0 / NUM_EXPERTS)
        loss, _ = sara_alignment_loss(distributions, anchors, layers="all")
        loss.backward()
        router_grads = {
            name: parameter.grad
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and ".mlp.gate." in name
        }
        assert len(router_grads) >= 4
        assert all(grad is not None and grad.abs().sum() > 0 for grad in router_grads.values()), router_grads.keys()
        unpatch_model(model)
        assert not _our_hooks(model)


def test_public_api_is_exported():
    for name in hf_sara.__all__:
        assert hasattr(hf_sara, name)
