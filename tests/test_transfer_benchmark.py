"""The controlled transfer experiment (`benchmarks/transfer/`): its data keep the promised split, and it runs."""

import os
import sys

import pytest
import torch

TRANSFER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "transfer")
sys.path.insert(0, TRANSFER_DIR)

import run_transfer  # noqa: E402
from synthetic_languages import LOW_RESOURCE, World, ciphers  # noqa: E402


def _words(texts):
    return {word for text in texts for word in text.split()}


def test_languages_share_only_entity_names():
    words = ciphers()
    vocabularies = {language: set(mapping.values()) for language, mapping in words.items()}
    assert not vocabularies["en"] & vocabularies["xa"]
    assert not vocabularies["en"] & vocabularies["xb"]
    assert not vocabularies["xa"] & vocabularies["xb"]
    assert all(len(set(mapping.values())) == len(mapping) for mapping in words.values())  # one word per meaning


@pytest.mark.parametrize("seed", [0, 7])
def test_anchor_only_facts_never_appear_outside_english(seed):
    world = World(seed)
    assert len(world.anchor_only_entities) == 20 and len(world.shared_entities) == 40
    low_resource_words = set().union(*(set(world.words[language].values()) for language in LOW_RESOURCE))
    for text in world.pretraining_texts():
        if _words([text]) & low_resource_words:
            assert not _words([text]) & set(world.anchor_only_entities), text
    fine_tuning = world.qa_pairs(world.shared_entities)
    assert not _words(row["prompt"] for row in fine_tuning) & set(world.anchor_only_entities)
    held_out = world.qa_pairs(world.anchor_only_entities)
    assert {row["language"] for row in held_out} == set(LOW_RESOURCE)
    # the English facts of the anchor-only entities are in the corpus, as statements and as question/answer
    english = set(world.pretraining_texts())
    for fact in world.facts_of(world.anchor_only_entities):
        assert world.statement(fact, "en") in english
        assert world.question(fact, "en") + world.answer(fact, "en") in english


def test_question_and_candidates_are_single_words(tmp_path):
    world = World(0)
    tokenizer = run_transfer.word_tokenizer(world.pretraining_texts())
    fact = world.facts[0]
    for language in ("en", *LOW_RESOURCE):
        candidates = tokenizer.convert_tokens_to_ids(world.candidates(fact, language))
        assert tokenizer.unk_token_id not in candidates and len(set(candidates)) == 6
        answer_ids = tokenizer(world.answer(fact, language))["input_ids"]
        assert answer_ids[0] in candidates
        prompt = world.question(fact, language)
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + world.answer(fact, language))["input_ids"][: len(prompt_ids)] == prompt_ids


def test_smoke_run_writes_the_section(tmp_path, capsys):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"intro\n{run_transfer.BEGIN}\nold\n{run_transfer.END}\nafter\n", encoding="utf-8")
    results = run_transfer.main(["--seeds", "0", "--quick", "--write", str(markdown)])
    accuracy = results[0]["accuracy"]
    assert set(accuracy) == {"base", "SFT", "SARA"}
    assert all(0.0 <= value <= 1.0 for arm in accuracy.values() for value in arm.values())
    assert accuracy["SFT"] != accuracy["SARA"] or results[0]["divergence"]["SFT"] != results[0]["divergence"]["SARA"]
    text = markdown.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert "python benchmarks/transfer/run_transfer.py --seeds 0 --quick" in text
    assert "| SARA - SFT |" in text and "| SARA | xb |" in text


def test_expert_targets_follow_the_vocabularies():
    world = World(0)
    tokenizer = run_transfer.word_tokenizer(world.pretraining_texts())
    table = run_transfer._language_of_token(tokenizer, world)
    fact = world.facts_of(world.shared_entities)[0]
    lines = [
        world.statement(fact, "xa"),
        world.question(fact, "en") + world.answer(fact, "en"),
        "red = " + world.words["xb"]["red"],
    ]
    batch = tokenizer(lines, padding=True, return_tensors="pt")
    targets = run_transfer.expert_targets(batch["input_ids"], table, batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert real[2].sum() == 3 and not real.all()  # `red = word`, padded
    assert (targets[0][real[0]] == 1).all() and (targets[1][real[1]] == 0).all()  # every token of a one-language line
    assert targets[2, :3].tolist() == [0, -1, 2]  # a lexicon line: its two words only
    assert (targets[~real] == -1).all()  # never padding


def test_separated_arm_smoke_routes_languages_apart(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("<!-- transfer-arms:begin -->\nold\n<!-- transfer-arms:end -->\n", encoding="utf-8")
    results = run_transfer.main(["--seeds", "0", "--quick", "--base-routing", "both", "--write", str(markdown)])
    assert set(results) == {"shared", "separated"}
    for language in LOW_RESOURCE:
        shared = run_transfer.base_js(results["shared"][0], language)
        separated = run_transfer.base_js(results["separated"][0], language)
        # largely separate experts: far above the shared base, a good part of the way to ln 2 (disjoint experts)
        assert separated > 0.3 and separated > 5 * shared, (language, shared, separated)
    # the fine-tunings ran from the separated base like from the shared one
    assert set(results["separated"][0]["accuracy"]) == {"base", "SFT", "SARA"}
    text = markdown.read_text(encoding="utf-8")
    assert "old" not in text and "--base-routing both" in text
    assert "| separated | xa |" in text and "| shared | xb |" in text and "Separated arm in full" in text


def test_separated_pretraining_leaves_a_plain_model(tmp_path):
    from datasets import Dataset
    from transformers import Qwen3MoeForCausalLM
    from trl import SFTConfig

    from hf_sara.testing import tiny_qwen3_moe

    world = World(0)
    tokenizer = run_transfer.word_tokenizer(world.pretraining_texts())
    model = tiny_qwen3_moe(tokenizer, 0)
    trainer = run_transfer.separated_routing_trainer(
        model=model,
        args=SFTConfig(**run_transfer.training_arguments(str(tmp_path / "run"), 2, 3e-3, 0, 8)),
        train_dataset=Dataset.from_dict({"text": world.pretraining_texts()[:16]}),
        processing_class=tokenizer,
        language_of_token=run_transfer._language_of_token(tokenizer, world),
    )
    trainer.train()

    def separation_hooks():
        hooks = [hook for module in model.modules() for hook in module._forward_hooks.values()]
        return [hook for hook in hooks if "separated_routing_trainer" in hook.__qualname__]

    assert len(separation_hooks()) == 4  # one per router
    trainer.remove_separation_hooks()
    assert not separation_hooks()  # transformers' own output-capturing hooks stay, as after any forward
    model.save_pretrained(tmp_path / "base")
    reloaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base")
    assert type(reloaded) is Qwen3MoeForCausalLM
    state = model.state_dict()
    assert reloaded.state_dict().keys() == state.keys()
    assert all(torch.equal(state[name], value) for name, value in reloaded.state_dict().items())
