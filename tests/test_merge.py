"""`hf-sara merge`: a (SARA) LoRA adapter merged into its base model, saved as a plain model folder for serving."""

import json
import os
import re
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_sara import SARATrainer, patch_model, router_weight_names, routing_distributions
from hf_sara.cli import main
from hf_sara.compat import load_peft_adapter
from hf_sara.tools.merge import _same_model, merge_adapter
from hf_sara.training.model_card import sara_settings_section

from .testing_utils import load_pairs, pairs_tokenizer, random_batch, sara_config, tiny_model

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]  # fused 3D expert weights in transformers 5
# model_type: (LoRA on parameters besides the router's, whether the router gets LoRA, modules_to_save)
MERGED_FAMILIES = {
    "qwen3_moe": (EXPERTS, True, ["lm_head"]),  # LoRA on the router and on fused 3D experts
    "mixtral": (EXPERTS, False, ["gate"]),  # the router trained whole (modules_to_save)
    "gpt_oss": (EXPERTS, True, []),  # experts stored [experts, in, out], a router with a bias
    "deepseek_v3": (EXPERTS, True, ["lm_head"]),  # sigmoid router, a dense first layer, shared experts
    "granitemoe": (["experts.gate_up_proj"], False, ["router"]),
}
TOLERANCE = 1e-5


def _save_base(path, model_type, with_tokenizer=True, **overrides):
    tokenizer = pairs_tokenizer()
    model = tiny_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return str(path)


def _save_adapter(path, base_dir, model_type, seed=0):
    """A LoRA adapter with random (non-zero) weights on attention, router and experts, and perturbed
    modules_to_save, so that it changes the model's outputs and routing a lot."""
    extra_parameters, router_lora, modules_to_save = MERGED_FAMILIES[model_type]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj"],
        target_parameters=(router_weight_names(base) if router_lora else []) + extra_parameters,
        modules_to_save=modules_to_save or None,
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(path)
    return str(path)


def _logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _assert_plain_model_folder(path):
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files, files
    assert not any(name.startswith("adapter_") for name in files), files
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    assert not [name for name in names if "lora_" in name or "base_layer" in name or "modules_to_save" in name]


def _no_leftovers(parent):
    return [name for name in os.listdir(parent) if name.startswith(".")]


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """A qwen3_moe base (with a tokenizer) and an adapter for it, shared by the refusal tests."""
    root = tmp_path_factory.mktemp("qwen")
    base_dir = _save_base(root / "base", "qwen3_moe")
    return base_dir, _save_adapter(root / "adapter", base_dir, "qwen3_moe")


@pytest.mark.parametrize("model_type", list(MERGED_FAMILIES))
def test_merged_model_equals_the_adapter_model(tmp_path, model_type):
    base_dir = _save_base(tmp_path / "base", model_type)
    adapter_dir = _save_adapter(tmp_path / "adapter", base_dir, model_type)
    output_dir = str(tmp_path / "merged")
    result = merge_adapter(base_dir, adapter_dir, output_dir)

    _assert_plain_model_folder(output_dir)
    assert _no_leftovers(tmp_path) == []
    reference = load_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    extra_parameters, router_lora, modules_to_save = MERGED_FAMILIES[model_type]
    targets = (router_weight_names(base) if router_lora else []) + extra_parameters
    names = [name.split(".")[-1] for name, _ in base.named_modules()]
    assert result.lora_modules == sum(name in ("q_proj", "v_proj", "o_proj") for name in names) > 0
    assert result.modules_to_save == sum(name in modules_to_save for name in names)
    assert result.lora_parameters == sum(any(name.endswith(t) for t in targets) for name, _ in base.named_parameters())
    assert result.tokenizer_source == "base model" and not result.sara_settings
    assert type(merged) is type(base)
    # As the base had it (DeepSeek-V3's config has no `output_router_logits` before transformers 5.19).
    assert getattr(merged.config, "output_router_logits", False) is getattr(base.config, "output_router_logits", False)
    assert getattr(base.config, "output_router_logits", False) is False

    input_ids, attention_mask = random_batch()
    expected = _logits(reference, input_ids, attention_mask)
    difference = (_logits(merged, input_ids, attention_mask) - expected).abs().max().item()
    print(f"{model_type}: max |merged - adapter| logit difference {difference:.2e}")
    assert difference < TOLERANCE
    assert (_logits(base, input_ids, attention_mask) - expected).abs().max() > 0.1  # the adapter does change them

    routing = routing_distributions(patch_model(merged), input_ids, attention_mask)
    expected_routing = routing_distributions(patch_model(reference), input_ids, attention_mask)
    torch.testing.assert_close(routing, expected_routing, atol=TOLERANCE, rtol=0)
    base_routing = routing_distributions(patch_model(base), input_ids, attention_mask)
    assert (base_routing - expected_routing).abs().max() > 1e-4  # the routers were adapted

    prompt = input_ids[:1, :5]
    generated = merged.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11)
    assert torch.equal(
        generated, reference.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    )


def test_sara_trainer_adapter_through_the_command_line(tmp_path, capsys):
    """An adapter saved by SARATrainer (tokenizer in the adapter folder only, SARA settings in its card), merged
    with `hf-sara merge`; the base's `output_router_logits=True` is kept."""
    base_dir = _save_base(tmp_path / "base", "qwen3_moe", with_tokenizer=False, output_router_logits=True)
    adapter_dir = str(tmp_path / "adapter")
    trainer = SARATrainer(
        model=patch_model(AutoModelForCausalLM.from_pretrained(base_dir)),
        args=sara_config(adapter_dir, learning_rate=2e-2, max_steps=2),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
        peft_config=LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            target_parameters=EXPERTS + ["mlp.gate.weight"],
        ),
    )
    trainer.train()
    trainer.save_model()
    output_dir = str(tmp_path / "merged")

    assert main(["merge", "--adapter", adapter_dir, "--output-dir", output_dir]) == 0  # base read from the adapter
    out = capsys.readouterr().out
    assert "SARA settings copied from the adapter card" in out and "tokenizer from the adapter" in out

    _assert_plain_model_folder(output_dir)
    with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["output_router_logits"] is True
    assert os.path.isfile(os.path.join(output_dir, "chat_template.jinja"))  # the adapter's tokenizer
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    settings = sara_settings_section((tmp_path / "adapter" / "README.md").read_text(encoding="utf-8"))
    assert "| sara_weight | 1.5 |" in settings and settings in card
    assert f"| base model | `{base_dir}` |" in card and "| output_router_logits | True" in card
    assert "| target_parameters | `experts.down_proj`, `experts.gate_up_proj`, `mlp.gate.weight` |" in card

    reference = load_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    input_ids, attention_mask = random_batch()
    expected = _logits(reference, input_ids, attention_mask)
    assert (_logits(merged, input_ids, attention_mask) - expected).abs().max() < TOLERANCE
    assert (_logits(base, input_ids, attention_mask) - expected).abs().max() > 1e-3  # training moved the weights


def test_card_without_sara_settings_says_so(tmp_path, qwen_pair):
    base_dir, adapter_dir = qwen_pair
    merge_adapter(base_dir, adapter_dir, str(tmp_path / "merged"))
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    assert "## SARA settings\n\nNot recorded" in card and "| modules_to_save | `lm_head` |" in card


def test_trained_lm_head_of_tied_embeddings(tmp_path):
    """A base that ties its input and output embeddings, with `lm_head` trained whole: the merged model keeps the
    trained head (PEFT unties them) and the embeddings the base had."""
    base_dir = _save_base(tmp_path / "base", "qwen3_moe", tie_word_embeddings=True)
    adapter_dir = _save_adapter(tmp_path / "adapter", base_dir, "qwen3_moe")
    merge_adapter(base_dir, adapter_dir, str(tmp_path / "merged"))
    reference = load_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    input_ids, attention_mask = random_batch()
    expected = _logits(reference, input_ids, attention_mask)
    assert (_logits(merged, input_ids, attention_mask) - expected).abs().max() < TOLERANCE
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.testing.assert_close(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)
    assert "| tie_word_embeddings | False" in (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("embedding", ["lm_head", "embed_tokens"])
def test_lora_on_one_of_tied_embeddings(tmp_path, embedding):
    """LoRA on the output (or input) embedding of a base that ties them: the adapter model changes that side only, so
    the merged model unties them (merging into the shared weight changed both: logits off by 8, `tie=True` kept)."""
    base_dir = _save_base(tmp_path / "base", "qwen3_moe", tie_word_embeddings=True)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[embedding, "q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(tmp_path / "adapter")
    merge_adapter(base_dir, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    reference = load_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    input_ids, attention_mask = random_batch()
    expected = _logits(reference, input_ids, attention_mask)
    assert (_logits(merged, input_ids, attention_mask) - expected).abs().max() < TOLERANCE
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (_logits(base, input_ids, attention_mask) - expected).abs().max() > 0.1
    assert merged.config.tie_word_embeddings is False
    assert "| tie_word_embeddings | False" in (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")


def _damaged_copy(adapter_dir, path, damage):
    copy = shutil.copytree(adapter_dir, path)
    damage(copy)
    return str(copy)


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _record_base(adapter_dir, base):
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["base_model_name_or_path"] = base
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


class TestRefusals:
    def _assert_refused(self, tmp_path, error, match, *args, **kwargs):
        output_dir = tmp_path / "merged"
        with pytest.raises(error, match=match):
            merge_adapter(*args, str(output_dir), **kwargs)
        assert not output_dir.exists() and _no_leftovers(tmp_path) == []

    def test_base_name_differs_from_the_adapter_config(self, tmp_path, qwen_pair):
        base_dir, adapter_dir = qwen_pair
        renamed = shutil.copytree(adapter_dir, tmp_path / "adapter")
        config_path = renamed / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = "someone/another-moe"
        config_path.write_text(json.dumps(config))
        self._assert_refused(
            tmp_path, ValueError, "trained on 'someone/another-moe'.*allow-base-name-mismatch", base_dir, str(renamed)
        )
        # A copy of the right base under another name: accepted when asked, since every shape fits.
        merge_adapter(base_dir, str(renamed), str(tmp_path / "merged"), allow_base_name_mismatch=True)
        assert (tmp_path / "merged" / "model.safetensors").exists()

    @pytest.mark.parametrize(
        "overrides, match",
        [
            (dict(num_experts=4), r"mismatch.*is \[32, 32\] in the adapter but \[16, 32\] for this base"),
            (dict(num_hidden_layers=2), r"the base has no 'base_model\.model\.model\.layers\.2\."),  # PEFT: silent
            (dict(hidden_size=64, head_dim=16), r"mismatch"),
        ],
    )
    def test_other_shapes(self, tmp_path, qwen_pair, overrides, match):
        _, adapter_dir = qwen_pair
        other = _save_base(tmp_path / "other", "qwen3_moe", **overrides)
        self._assert_refused(tmp_path, ValueError, match, other, adapter_dir, allow_base_name_mismatch=True)

    def test_other_architecture(self, tmp_path, qwen_pair):
        _, adapter_dir = qwen_pair
        other = _save_base(tmp_path / "other", "mixtral")
        self._assert_refused(tmp_path, ValueError, "trained on", other, adapter_dir)
        self._assert_refused(
            tmp_path,
            ValueError,
            "made for a Qwen3MoeForCausalLM.*is a MixtralForCausalLM",
            other,
            adapter_dir,
            allow_base_name_mismatch=True,
        )

    def test_no_tokenizer_anywhere(self, tmp_path, qwen_pair):
        _, adapter_dir = qwen_pair
        bare = _save_base(tmp_path / "bare", "qwen3_moe", with_tokenizer=False)
        self._assert_refused(tmp_path, ValueError, "has a tokenizer", bare, adapter_dir, allow_base_name_mismatch=True)

    def test_non_empty_output_needs_overwrite(self, tmp_path, qwen_pair):
        base_dir, adapter_dir = qwen_pair
        output_dir = tmp_path / "merged"
        output_dir.mkdir()
        (output_dir / "old.txt").write_text("old")
        with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
            merge_adapter(base_dir, adapter_dir, str(output_dir))
        assert os.listdir(output_dir) == ["old.txt"]
        merge_adapter(base_dir, adapter_dir, str(output_dir), overwrite=True)
        assert not (output_dir / "old.txt").exists() and (output_dir / "model.safetensors").exists()
        assert _no_leftovers(tmp_path) == []
        with pytest.raises(ValueError, match="is \\(or holds\\) the adapter"):
            merge_adapter(base_dir, adapter_dir, adapter_dir, overwrite=True)
        assert os.path.isfile(os.path.join(adapter_dir, "adapter_config.json"))

    def test_failure_while_writing_leaves_nothing(self, tmp_path, qwen_pair, monkeypatch):
        base_dir, adapter_dir = qwen_pair
        dead_pid = 2**22 + 12345  # above the default pid_max: no such process
        stale = tmp_path / f".merged.{dead_pid}.0.tmp"  # staged by a merge that was killed
        stale.mkdir()
        (stale / "model.safetensors").write_text("half")

        def fail(*args, **kwargs):
            raise RuntimeError("disk full")

        monkeypatch.setattr("hf_sara.tools.merge._model_card", fail)  # after the weights and tokenizer are written
        self._assert_refused(tmp_path, RuntimeError, "disk full", base_dir, adapter_dir)
        # Overwriting an existing model: on failure the old one stays as it was.
        (tmp_path / "merged").mkdir()
        (tmp_path / "merged" / "old.txt").write_text("old")
        with pytest.raises(RuntimeError, match="disk full"):
            merge_adapter(base_dir, adapter_dir, str(tmp_path / "merged"), overwrite=True)
        assert os.listdir(tmp_path / "merged") == ["old.txt"] and _no_leftovers(tmp_path) == []

    def test_command_line_error_is_one_line(self, tmp_path, qwen_pair, capsys):
        _, adapter_dir = qwen_pair
        other = _save_base(tmp_path / "other", "qwen3_moe", num_experts=4)
        output_dir = tmp_path / "merged"
        code = main(["merge", "--model", other, "--adapter", adapter_dir, "--output-dir", str(output_dir)])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and "hf-sara merge: error: The adapter" in errors[0]
        assert not output_dir.exists()

    @pytest.mark.parametrize(
        "damage, match",
        [
            (lambda folder: os.remove(folder / "adapter_model.safetensors"), "has no adapter_model.safetensors"),
            (lambda folder: _cut(folder / "adapter_model.safetensors"), "weights in .* cannot be read"),
            (
                lambda folder: (folder / "adapter_model.safetensors").write_bytes(os.urandom(5000)),
                "weights in .* cannot be read",
            ),
            (lambda folder: _cut(folder / "adapter_config.json"), r"adapter_config\.json is not valid JSON"),
            (lambda folder: _record_base(str(folder), str(folder.parent / "gone")), "does not exist any more"),
        ],
        ids=["no weights", "cut weights", "random weights", "cut config", "recorded base gone"],
    )
    def test_damaged_adapter_folder_is_one_line(self, tmp_path, qwen_pair, capsys, damage, match):
        # Were: "Repo id must be in the form ...", safetensors' traceback (exit 1), a JSON error naming no file.
        adapter_dir = _damaged_copy(qwen_pair[1], tmp_path / "adapter", damage)
        output_dir = tmp_path / "merged"
        code = main(["merge", "--adapter", adapter_dir, "--output-dir", str(output_dir)])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1, errors
        assert re.search(match, errors[0]) and "Repo id" not in errors[0]
        assert not output_dir.exists()

    def test_damaged_tokenizer_in_the_adapter(self, tmp_path, qwen_pair):
        base_dir, adapter_dir = qwen_pair

        def damage(folder):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(base_dir, name), folder / name)
            _cut(folder / "tokenizer.json")

        damaged = _damaged_copy(adapter_dir, tmp_path / "adapter", damage)  # was: the base's tokenizer, no word
        self._assert_refused(tmp_path, ValueError, "tokenizer files in .* cannot be loaded", base_dir, damaged)

    def test_a_merged_model_already_holds_the_adapter(self, tmp_path, qwen_pair):
        base_dir, adapter_dir = qwen_pair
        merge_adapter(base_dir, adapter_dir, str(tmp_path / "once"))
        output_dir = tmp_path / "twice"  # was: the LoRA update applied twice
        with pytest.raises(ValueError, match="already holds the adapter .* twice"):
            merge_adapter(str(tmp_path / "once"), adapter_dir, str(output_dir), allow_base_name_mismatch=True)
        assert not output_dir.exists()

    def test_relative_recorded_base_is_taken_only_when_certain(self, tmp_path, qwen_pair, monkeypatch):
        base_dir, adapter_dir = qwen_pair
        relative = os.path.join("outputs", "demo", "base-model")
        for project in ("a", "b"):
            shutil.copytree(base_dir, tmp_path / project / relative)
        adapter = str(tmp_path / "a" / "outputs" / "demo" / "adapter")
        shutil.copytree(adapter_dir, adapter)
        _record_base(adapter, relative)
        monkeypatch.chdir(tmp_path / "b")  # another project with a base at the same relative path
        with pytest.raises(ValueError, match="relative path .* which base it means is not certain.*--model"):
            merge_adapter(None, adapter, str(tmp_path / "merged"))
        assert not (tmp_path / "merged").exists()
        monkeypatch.chdir(tmp_path / "a")  # where it was trained
        result = merge_adapter(None, adapter, str(tmp_path / "merged"))
        assert result.base_model == relative

    def test_full_disk_leaves_nothing(self, tmp_path, qwen_pair, capsys, monkeypatch):
        from safetensors import SafetensorError

        def full(*args, **kwargs):
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            )

        monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full)
        base_dir, adapter_dir = qwen_pair
        output_dir = tmp_path / "merged"
        code = main(["merge", "--model", base_dir, "--adapter", adapter_dir, "--output-dir", str(output_dir)])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and "No space left" in errors[0] and "nothing was left" in errors[0]
        assert not output_dir.exists() and _no_leftovers(tmp_path) == []


def test_same_model_references(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-30B-A3B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert _same_model("Qwen/Qwen3-30B-A3B", str(snapshot))
    assert _same_model(str(snapshot) + "/", "Qwen/Qwen3-30B-A3B")
    assert _same_model(str(snapshot), str(tmp_path / "hub" / ".." / "hub" / snapshot.relative_to(tmp_path / "hub")))
    assert not _same_model("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Instruct-2507")
    assert not _same_model("Qwen/Qwen3-30B-A3B", str(tmp_path))  # a folder under another name: not guessed
