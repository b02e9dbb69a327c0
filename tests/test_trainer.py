"""SARATrainer against TRL's SFTTrainer, dataset formats, anchors, gradient accumulation, saving and resuming."""

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from hf_sara import SARATrainer, js_divergence, patch_model, routing_distributions
from hf_sara.compat import load_peft_adapter
from hf_sara.training.anchors import ANCHORS_FILE_NAME

from .testing_utils import (
    load_pairs,
    pairs_in_format,
    pairs_model,
    pairs_tokenizer,
    read_anchor_file,
    sara_config,
    sft_config,
    tiny_model,
)

FORMATS = ["prompt_completion", "conversational_prompt_completion", "messages", "text"]


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _js_log(trainer):
    return [entry["sara/js"] for entry in trainer.state.log_history if "sara/js" in entry]


def _pair_divergence(model, dataset):
    """Mean JS between each example's routing and its anchor's under `model`, on prompt+completion text."""
    tokenizer = pairs_tokenizer()
    model.eval()
    with torch.no_grad():
        divergences = []
        for row in dataset:
            example = tokenizer(row["prompt"] + row["completion"], return_tensors="pt")
            anchor = tokenizer(row["anchor_prompt"] + row["anchor_completion"], return_tensors="pt")
            divergences.append(
                js_divergence(
                    routing_distributions(model, example.input_ids), routing_distributions(model, anchor.input_ids)
                ).mean()
            )
    return torch.stack(divergences).mean().item()


class TestEquivalenceWithSFT:
    @pytest.mark.parametrize("anchor_mode", ["offline", "online"])
    def test_zero_weight_trains_exactly_like_sft_trainer(self, tmp_path, anchor_mode):
        pairs = load_pairs()
        sft = SFTTrainer(
            model=pairs_model(),
            args=sft_config(tmp_path / "sft"),
            train_dataset=pairs,
            processing_class=pairs_tokenizer(),
        )
        sft.train()
        sara = SARATrainer(
            model=patch_model(pairs_model()),
            args=sara_config(tmp_path / "sara", sara_weight=0.0, sara_anchor_mode=anchor_mode),
            train_dataset=pairs,
            processing_class=pairs_tokenizer(),
        )
        sara.train()
        assert len(_losses(sara)) == 4
        for ours, theirs in zip(_losses(sara), _losses(sft), strict=True):
            assert ours == pytest.approx(theirs, abs=1e-6)
        theirs = dict(sft.model.named_parameters())
        for name, parameter in sara.model.named_parameters():
            torch.testing.assert_close(parameter, theirs[name], rtol=0, atol=1e-6)
        assert all(js >= 0 for js in _js_log(sara))  # the divergence is still measured and logged


class TestAlignment:
    def test_sara_lowers_routing_divergence_compared_with_sft(self, tmp_path):
        pairs = load_pairs()
        # Start from a model whose routing already differs between the languages (plain SFT drives them apart).
        base = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path / "base", sara_weight=0.0, max_steps=30, learning_rate=3e-3),
            train_dataset=pairs,
            processing_class=pairs_tokenizer(),
        )
        base.train()
        base_state = {k: v.clone() for k, v in base.model.state_dict().items()}
        runs = {}
        for name, weight in (("sft", 0.0), ("sara", 1.5)):
            model = pairs_model()
            model.load_state_dict(base_state)
            trainer = SARATrainer(
                model=model,
                args=sara_config(
                    tmp_path / name, sara_weight=weight, sara_anchor_mode="online", max_steps=30, learning_rate=3e-3
                ),
                train_dataset=pairs,
                processing_class=pairs_tokenizer(),
            )
            trainer.train()
            runs[name] = trainer
        js = _js_log(runs["sara"])
        assert sum(js[-5:]) / 5 < sum(js[:5]) / 5, js
        sft_divergence = _pair_divergence(runs["sft"].model, pairs)
        sara_divergence = _pair_divergence(runs["sara"].model, pairs)
        assert sara_divergence < 0.5 * sft_divergence, (sara_divergence, sft_divergence)


class TestDatasetFormats:
    @pytest.mark.parametrize("dataset_format", FORMATS)
    @pytest.mark.parametrize("anchor_mode", ["offline", "online"])
    def test_every_format_trains_and_logs_js(self, tmp_path, dataset_format, anchor_mode):
        dataset = pairs_in_format(dataset_format)
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, sara_anchor_mode=anchor_mode, max_steps=2),
            train_dataset=dataset,
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        logged = trainer.state.log_history[0]
        assert logged["sara/js"] > 0
        assert {"sara/js_sw", "sara/js_hi", "sara/js_layer_0", "sara/weight"} <= set(logged)

    @pytest.mark.parametrize("dataset_format", FORMATS)
    def test_rows_without_anchor_are_left_out_of_the_alignment(self, tmp_path, dataset_format):
        dataset = pairs_in_format(dataset_format)
        anchor_columns = [name for name in dataset.column_names if name.startswith("anchor_")]
        rows = dataset.to_list()
        for row in rows[1::2]:  # every Hindi row loses its anchor
            for name in anchor_columns:
                row[name] = None
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=2),
            train_dataset=Dataset.from_list(rows),
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        logged = trainer.state.log_history[0]
        assert "sara/js_sw" in logged and "sara/js_hi" not in logged

    def test_assistant_only_loss_with_completion_pooling(self, tmp_path):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, assistant_only_loss=True, sara_pooling="completion", max_steps=1),
            train_dataset=pairs_in_format("messages"),
            processing_class=pairs_tokenizer(),
        )
        row = trainer.train_dataset[0]
        assert -100 in row["labels"] and any(label != -100 for label in row["labels"])  # only the assistant turn
        trainer.train()
        assert trainer.state.log_history[0]["sara/js"] > 0

    def test_padding_free_gives_the_same_alignment_as_padding(self, tmp_path):
        runs = {}
        for name, extra in (("padded", {}), ("padding_free", {"padding_free": True, "max_length": None})):
            trainer = SARATrainer(
                model=pairs_model(),
                args=sara_config(tmp_path / name, sara_anchor_mode="online", max_steps=2, **extra),
                train_dataset=load_pairs(),
                processing_class=pairs_tokenizer(),
            )
            trainer.train()
            runs[name] = trainer.state.log_history[0]
        assert runs["padding_free"]["sara/js"] == pytest.approx(runs["padded"]["sara/js"], rel=1e-4)

    def test_packing_keeps_each_example_paired(self, tmp_path):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, packing=True, max_length=64, max_steps=2, per_device_train_batch_size=2),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        assert "sara_token_rows" in trainer.train_dataset.column_names
        assert len(trainer.train_dataset) < len(load_pairs())  # several examples per packed row
        trainer.train()
        assert trainer.state.log_history[0]["sara/js"] > 0


class TestBadInput:
    def _trainer(self, tmp_path, dataset, **overrides):
        return SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, **overrides),
            train_dataset=dataset,
            processing_class=pairs_tokenizer(),
        )

    def test_missing_anchor_columns(self, tmp_path):
        dataset = load_pairs().remove_columns(["anchor_prompt", "anchor_completion"])
        with pytest.raises(ValueError, match=r"no anchor columns.*\['anchor_completion', 'anchor_prompt'\]"):
            self._trainer(tmp_path, dataset)

    def test_anchor_in_another_format(self, tmp_path):
        messages = pairs_in_format("messages")
        dataset = load_pairs().remove_columns(["anchor_prompt", "anchor_completion"])
        dataset = dataset.add_column("anchor_messages", messages["anchor_messages"])
        with pytest.raises(ValueError, match="anchor_completion.*missing.*same format"):
            self._trainer(tmp_path, dataset)

    def test_conversational_example_with_plain_anchor(self, tmp_path):
        rows = pairs_in_format("conversational_prompt_completion").to_list()
        rows[3]["anchor_prompt"] = [{"role": "user", "content": "plain"}]
        rows[3]["anchor_completion"] = [{"role": "assistant", "content": "text"}]
        rows[5]["anchor_prompt"], rows[5]["anchor_completion"] = None, None
        dataset = Dataset.from_list(rows)
        trainer = self._trainer(tmp_path, dataset, max_steps=1)  # None anchors are fine
        assert trainer is not None
        plain = load_pairs().to_list()
        plain[2]["anchor_prompt"] = None
        with pytest.raises(ValueError, match=r"Row 2 has an incomplete anchor"):
            self._trainer(tmp_path, Dataset.from_list(plain))

    def test_unknown_format(self, tmp_path):
        dataset = Dataset.from_dict({"question": ["a"], "anchor_question": ["b"]})
        with pytest.raises(ValueError, match="Cannot tell the format"):
            self._trainer(tmp_path, dataset)

    def test_no_anchor_at_all(self, tmp_path):
        rows = load_pairs().to_list()
        for row in rows:
            row["anchor_prompt"] = row["anchor_completion"] = None
        with pytest.raises(ValueError, match="No row of the train dataset has an anchor"):
            self._trainer(tmp_path, Dataset.from_list(rows))

    def test_sequences_emptied_by_truncation_are_named(self, tmp_path):
        rows = load_pairs().to_list()
        rows[5]["prompt"] = " ".join(["Mji mkuu wa Kenya ni upi?"] * 20)
        with pytest.raises(ValueError, match=r"row\(s\) \[5\] keep no token in the loss after truncation"):
            self._trainer(tmp_path, Dataset.from_list(rows), max_length=32)
        rows = load_pairs().to_list()
        rows[7]["anchor_prompt"] = " ".join(["What is the capital of Kenya?"] * 20)
        with pytest.raises(ValueError, match=r"the anchor of row\(s\) \[7\] keep no token"):
            self._trainer(tmp_path, Dataset.from_list(rows), max_length=32)

    def test_formatting_func_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="formatting_func"):
            SARATrainer(
                model=pairs_model(),
                args=sara_config(tmp_path),
                train_dataset=load_pairs(),
                processing_class=pairs_tokenizer(),
                formatting_func=lambda row: row["prompt"],
            )

    def test_config_errors_name_the_field(self, tmp_path):
        with pytest.raises(ValueError, match="sara_anchor_mode"):
            sara_config(tmp_path, sara_anchor_mode="sometimes")
        with pytest.raises(ValueError, match="sara_pooling"):
            sara_config(tmp_path, sara_pooling="middle")
        with pytest.raises(ValueError, match="wrapped"):
            sara_config(tmp_path, packing=True, packing_strategy="wrapped")
        with pytest.raises(ValueError, match="out of range"):
            self._trainer(tmp_path, load_pairs(), sara_layers="2-9")


class TestOfflineAnchors:
    def test_anchors_are_cached_with_metadata_and_reused(self, tmp_path):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=1),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        anchors = trainer.train_anchor_table()
        path = tmp_path / ANCHORS_FILE_NAME
        tensors, metadata = read_anchor_file(path)
        assert anchors.shape == (16, 4, 8)
        torch.testing.assert_close(tensors["train.distributions"], anchors)
        assert metadata["num_moe_layers"] == "4" and metadata["pooling"] == "all"
        assert json.loads(metadata["datasets"])["train"]["rows"] == 16

        # The cached anchors equal the routing of the anchors under the untrained model, row by row.
        tokenizer = pairs_tokenizer()
        model = patch_model(pairs_model()).eval()
        row = load_pairs()[3]
        ids = tokenizer(row["anchor_prompt"] + row["anchor_completion"] + tokenizer.eos_token, return_tensors="pt")
        with torch.no_grad():
            expected = routing_distributions(model, ids.input_ids)[0]
        torch.testing.assert_close(anchors[3], expected, rtol=0, atol=1e-6)

        # A second trainer with the same model and data reuses the file (it is not rewritten).
        mtime = os.path.getmtime(path)
        again = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=1),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        torch.testing.assert_close(again.train_anchor_table(), anchors)
        assert os.path.getmtime(path) == mtime

    def test_anchors_of_another_model_or_dataset_are_refused(self, tmp_path):
        SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        ).train_anchor_table()
        other_model = SARATrainer(
            model=pairs_model(seed=1),
            args=sara_config(tmp_path),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        with pytest.raises(ValueError, match="other router weights.*remove the file to recompute"):
            other_model.train()
        other_data = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path),
            train_dataset=load_pairs().select(range(8)),
            processing_class=pairs_tokenizer(),
        )
        with pytest.raises(ValueError, match="another train dataset: 16 rows there, 8 here"):
            other_data.train()


class TestTraining:
    def test_gradient_accumulation_gives_the_same_update(self, tmp_path):
        # The load-balancing loss is off: it is a non-linear statistic of each micro-batch, so it differs between
        # accumulation settings in SFTTrainer itself (1e-5 here). The SFT and alignment terms are linear.
        params = {}
        for name, (batch, steps) in {"ga1": (8, 1), "ga4": (2, 4)}.items():
            trainer = SARATrainer(
                model=pairs_model(),
                args=sara_config(
                    tmp_path / name,
                    per_device_train_batch_size=batch,
                    gradient_accumulation_steps=steps,
                    max_steps=1,
                    sara_anchor_mode="online",
                    optim="sgd",
                    learning_rate=1.0,
                    lr_scheduler_type="constant",
                    max_grad_norm=0.0,
                    router_aux_loss_coef=0.0,
                ),
                train_dataset=load_pairs(),
                processing_class=pairs_tokenizer(),
            )
            trainer.train()
            params[name] = dict(trainer.model.named_parameters())
        for key, value in params["ga1"].items():
            torch.testing.assert_close(params["ga4"][key], value, rtol=0, atol=1e-5, msg=key)

    def test_warmup_raises_the_weight_linearly(self, tmp_path):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=4, sara_warmup_ratio=0.5),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        weights = [entry["sara/weight"] for entry in trainer.state.log_history if "sara/weight" in entry]
        # 2 warm-up steps: the first optimizer step already trains with half the weight (never with 0).
        assert weights == [0.75, 1.5, 1.5, 1.5]

    def test_resume_without_the_first_runs_anchors_is_refused(self, tmp_path):
        def trainer():
            return SARATrainer(
                model=pairs_model(),
                args=sara_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
                train_dataset=load_pairs(),
                processing_class=pairs_tokenizer(),
            )

        trainer().train()
        os.remove(tmp_path / ANCHORS_FILE_NAME)
        # Computing them now would use the checkpoint's weights, not the model before training.
        with pytest.raises(ValueError, match="does not exist, and they must come from the model before training"):
            trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))

    def test_resume_reproduces_the_uninterrupted_run(self, tmp_path):
        def run(output_dir, max_steps, resume=None):
            trainer = SARATrainer(
                model=pairs_model(),
                # SGD: with AdamW, TRL's plain SFTTrainer itself resumes 2e-3 off the uninterrupted run here.
                args=sara_config(
                    output_dir,
                    max_steps=max_steps,
                    save_strategy="steps",
                    save_steps=2,
                    sara_warmup_ratio=0.5,
                    optim="sgd",
                    learning_rate=0.5,
                ),
                train_dataset=load_pairs(),
                processing_class=pairs_tokenizer(),
            )
            trainer.train(resume_from_checkpoint=resume)
            return trainer

        full = run(tmp_path / "full", 6)
        partial = tmp_path / "partial"
        run(partial, 6).state  # noqa: B018 - the run writes checkpoint-2, -4 and -6
        resumed = run(partial, 6, resume=str(partial / "checkpoint-2"))
        resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 2]
        full_losses = [e["loss"] for e in full.state.log_history if "loss" in e and e["step"] > 2]
        # TRL's plain SFTTrainer resumes 9e-5 off its uninterrupted run here: transformers' Trainer does not restore
        # fused MoE experts from a checkpoint. SARATrainer loads them through the checkpoint conversion.
        assert resumed_losses == pytest.approx(full_losses, abs=1e-6)
        resumed_js = [e["sara/js"] for e in resumed.state.log_history if "sara/js" in e and e["step"] > 2]
        full_js = [e["sara/js"] for e in full.state.log_history if "sara/js" in e and e["step"] > 2]
        assert resumed_js == pytest.approx(full_js, rel=1e-2)
        resumed_weights = [e["sara/weight"] for e in resumed.state.log_history if "sara/weight" in e]
        assert resumed_weights == [0.5, 1.0, 1.5, 1.5, 1.5, 1.5]  # the warm-up schedule continues

    def test_eval_logs_js(self, tmp_path):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=1),
            train_dataset=load_pairs(),
            eval_dataset=load_pairs().select(range(6)),
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        metrics = trainer.evaluate()
        assert metrics["eval_sara/js"] >= 0 and "eval_sara/js_sw" in metrics

    def test_named_eval_datasets_log_their_sara_metrics_apart(self, tmp_path):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=1),
            train_dataset=load_pairs(),
            eval_dataset={"sw": load_pairs().select(range(4)), "hi": load_pairs().select(range(8, 12))},
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        metrics = trainer.evaluate()
        assert {"eval_sw_loss", "eval_sw_sara/js", "eval_hi_loss", "eval_hi_sara/js"} <= set(metrics)
        assert metrics["eval_sw_sara/js"] != metrics["eval_hi_sara/js"]
        assert not any(key.startswith("eval_sara/") for key in metrics)

    def test_non_finite_routing_is_refused_naming_the_layers(self, tmp_path):
        model = pairs_model()
        with torch.no_grad():
            model.model.layers[2].mlp.gate.weight[0, 0] = float("nan")
        online = SARATrainer(
            model=model,
            args=sara_config(tmp_path / "online", max_steps=1, sara_anchor_mode="online"),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        with pytest.raises(RuntimeError, match=r"routing of MoE layer\(s\) \[2, 3\] is not finite .* Lower the"):
            online.train()
        offline = SARATrainer(
            model=model,
            args=sara_config(tmp_path / "offline", max_steps=1),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        with pytest.raises(ValueError, match=r"routing of the anchors of row\(s\) \[0, 1, 2, 3\] of the train"):
            offline.train()
        assert not (tmp_path / "offline" / "sara_anchors.safetensors").exists()

    def test_generate_works_after_training(self, tmp_path):
        model = pairs_model()
        trainer = SARATrainer(
            model=model,
            args=sara_config(tmp_path, max_steps=1),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        ids = pairs_tokenizer()("Jua huchomoza wapi?", return_tensors="pt").input_ids
        out = trainer.model.eval().generate(ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 3


class TestSaving:
    def test_lora_adapter_round_trip_gives_the_same_routing(self, tmp_path):
        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight"]
        )
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, max_steps=3, learning_rate=1e-2),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
            peft_config=peft_config,
        )
        trainer.train()
        trainer.save_model()
        assert (tmp_path / "adapter_model.safetensors").exists()
        card = (tmp_path / "README.md").read_text()
        assert "## SARA settings" in card and "sara" in card and "| sara_weight | 1.5 |" in card

        ids = pairs_tokenizer()("Jua huchomoza wapi? Jua huchomoza mashariki.", return_tensors="pt").input_ids
        with torch.no_grad():
            trained = routing_distributions(trainer.model.eval(), ids)
            reloaded = patch_model(load_peft_adapter(pairs_model(), tmp_path).eval())
            again = routing_distributions(reloaded, ids)
            base = routing_distributions(patch_model(pairs_model()).eval(), ids)
        torch.testing.assert_close(again, trained, rtol=0, atol=1e-6)
        assert not torch.allclose(base, trained, atol=1e-6)  # the adapter did change the routing


@pytest.mark.parametrize("model_type", ["phimoe", "granitemoe", "llama4_text", "mixtral", "deepseek_v3", "gpt_oss"])
def test_families_that_trip_sft_trainer_train_and_generate(tmp_path, model_type):
    """TRL's fused LM head fails on PhiMoE and GraniteMoE (`num_experts`) and on Llama 4 (`base_model_prefix`);
    SARATrainer works around both while it trains, then leaves the model as it was, able to generate."""
    tokenizer = pairs_tokenizer()
    model = tiny_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    ).train()
    had_num_experts = hasattr(model.config, "num_experts")
    prefix = model.base_model_prefix
    # DeepSeek-V3's config has no `output_router_logits` before transformers 5.19.
    output_router_logits = getattr(model.config.get_text_config(), "output_router_logits", None)
    trainer = SARATrainer(
        model=model, args=sara_config(tmp_path, max_steps=2), train_dataset=load_pairs(), processing_class=tokenizer
    )
    trainer.train()
    assert trainer.state.log_history[0]["sara/js"] > 0
    assert hasattr(model.config, "num_experts") == had_num_experts
    assert model.base_model_prefix == prefix
    # TRL leaves it True
    assert getattr(model.config.get_text_config(), "output_router_logits", None) == output_router_logits
    ids = tokenizer("Jua huchomoza wapi?", return_tensors="pt").input_ids
    assert model.eval().generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


class TestSettings:
    def _train(self, tmp_path, **overrides):
        trainer = SARATrainer(
            model=pairs_model(),
            args=sara_config(tmp_path, **overrides),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        return trainer

    def test_gradient_checkpointing_gives_the_same_losses(self, tmp_path):
        plain = self._train(tmp_path / "plain", sara_anchor_mode="online")
        checkpointed = self._train(tmp_path / "gc", sara_anchor_mode="online", gradient_checkpointing=True)
        assert _losses(checkpointed) == pytest.approx(_losses(plain), abs=1e-5)
        assert _js_log(checkpointed) == pytest.approx(_js_log(plain), abs=1e-7)

    def test_bf16_mixed_precision(self, tmp_path):
        trainer = self._train(tmp_path, bf16=True, max_steps=2)
        assert all(0 <= js < 1 for js in _js_log(trainer))

    @pytest.mark.parametrize("pooling", ["prompt", "completion"])
    def test_pooling_modes_pool_different_tokens(self, tmp_path, pooling):
        everything = self._train(tmp_path / "all", max_steps=1)
        part = self._train(tmp_path / pooling, max_steps=1, sara_pooling=pooling)
        assert _js_log(part)[0] > 0 and _js_log(part)[0] != pytest.approx(_js_log(everything)[0])

    def test_anchor_sft_loss_is_added_and_logged(self, tmp_path):
        without = self._train(tmp_path / "without", max_steps=1)
        with_anchor = self._train(tmp_path / "with", max_steps=1, anchor_sft_weight=1.0)
        logged = with_anchor.state.log_history[0]
        assert logged["sara/anchor_sft_loss"] > 0
        assert logged["loss"] == pytest.approx(without.state.log_history[0]["loss"] + logged["sara/anchor_sft_loss"])


README_SNIPPET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def test_readme_three_line_integration_runs_verbatim(tmp_path, monkeypatch):
    text = open(README_SNIPPET, encoding="utf-8").read()
    snippet = text.split("<!-- three-line-integration -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert snippet.strip().count("\n") == 2  # three lines: the import, the patch, the trainer
    # As in real use, the model comes from a directory that also holds its tokenizer.
    pairs_model().save_pretrained(tmp_path / "tiny-moe")
    pairs_tokenizer().save_pretrained(tmp_path / "tiny-moe")
    monkeypatch.chdir(tmp_path)
    namespace = {"model": AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-moe"), "pairs": load_pairs()}
    exec(snippet, namespace)  # the README's own code
    trainer = namespace["trainer"]
    assert isinstance(trainer, SARATrainer) and trainer.args.sara_weight == 1.5
    trainer.args.max_steps, trainer.args.use_cpu, trainer.args.report_to = 1, True, []
    trainer.train()
    assert trainer.state.log_history[0]["sara/js"] >= 0
