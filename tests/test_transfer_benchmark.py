"""The controlled transfer experiment (`benchmarks/transfer/`): its data keep the promised split, and it runs."""

import os
import sys

import pytest

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
