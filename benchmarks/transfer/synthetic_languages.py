"""Synthetic languages and facts for the controlled transfer experiment.

Three languages describe the same world of entities and their attributes (colour, city, food):

- `en`, the anchor language;
- `xa`, a cipher of `en` (every word but the entity names replaced by an invented word), same word order;
- `xb`, another cipher with a different word order (entity first, verb last), like a SOV language.

Entity names (`e00`, `e01`, ...) are shared, like proper nouns. The entities are split in two:

- *shared* entities: their facts are stated in every language in the pre-training corpus;
- *anchor-only* entities: their facts are stated and asked only in `en`.

The pre-training corpus also holds a bilingual lexicon (`red = toru`) for every word of `xa` and `xb`, and English
questions and answers about every entity. Fine-tuning teaches questions and answers in `xa` and `xb` about the
shared entities, each paired with its English version (the anchor). The held-out test asks about the anchor-only
entities in `xa` and `xb`: knowledge the model only ever saw in English.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RELATIONS = {
    "color": ("red", "blue", "green", "black", "white", "yellow"),
    "city": ("paris", "lima", "cairo", "oslo", "delhi", "quito"),
    "food": ("rice", "bread", "fish", "beans", "corn", "soup"),
}
FUNCTION_WORDS = ("the", "of", "is", "what")
LOW_RESOURCE = ("xa", "xb")
LANGUAGES = ("en", *LOW_RESOURCE)
_SYLLABLES = ("ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "ze", "po", "gu", "da", "fe", "hi", "ju", "wo")
LANGUAGE_SEED = 20261123  # the languages are fixed; the world (who has which attribute) changes with the seed


def _cipher(seed: int, taken: set[str]) -> dict[str, str]:
    rng = random.Random(seed)
    words = [*FUNCTION_WORDS, *RELATIONS, *(value for values in RELATIONS.values() for value in values)]
    mapping = {}
    for word in words:
        while True:
            invented = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
            if invented not in taken:
                break
        taken.add(invented)
        mapping[word] = invented
    return mapping


def ciphers() -> dict[str, dict[str, str]]:
    """The word of each low-resource language for each English word (the identity for `en`)."""
    english = [*FUNCTION_WORDS, *RELATIONS, *(value for values in RELATIONS.values() for value in values)]
    taken = set(english)
    return {
        "en": {word: word for word in english},
        "xa": _cipher(LANGUAGE_SEED, taken),
        "xb": _cipher(LANGUAGE_SEED + 1, taken),
    }


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


class World:
    """
    The facts of one seed and how each language says them.

    Args:
        seed (`int`): chooses each entity's attributes and which entities are anchor-only.
        entities (`int`): number of entities.
        anchor_only (`int`): how many of them are only ever described in `en`.
    """

    def __init__(self, seed: int, entities: int = 60, anchor_only: int = 20):
        rng = random.Random(seed)
        self.words = ciphers()
        names = [f"e{index:02d}" for index in range(entities)]
        rng.shuffle(names)
        self.anchor_only_entities = sorted(names[:anchor_only])
        self.shared_entities = sorted(names[anchor_only:])
        self.facts = [
            Fact(name, relation, rng.choice(values))
            for name in sorted(names)
            for relation, values in RELATIONS.items()
        ]

    def _w(self, language: str, word: str) -> str:
        return self.words[language][word]

    def statement(self, fact: Fact, language: str) -> str:
        w = lambda word: self._w(language, word)  # noqa: E731
        if language == "xb":
            return f"{fact.entity} {w(fact.relation)} {w(fact.value)} {w('is')} ."
        return f"{w('the')} {w(fact.relation)} {w('of')} {fact.entity} {w('is')} {w(fact.value)} ."

    def question(self, fact: Fact, language: str) -> str:
        w = lambda word: self._w(language, word)  # noqa: E731
        if language == "xb":
            return f"{fact.entity} {w(fact.relation)} {w('what')} ?"
        return f"{w('what')} {w('is')} {w('the')} {w(fact.relation)} {w('of')} {fact.entity} ?"

    def answer(self, fact: Fact, language: str) -> str:
        return f" {self._w(language, fact.value)} ."

    def candidates(self, fact: Fact, language: str) -> list[str]:
        """Every value of the fact's relation in `language`: the choices of the multiple-choice test."""
        return [self._w(language, value) for value in RELATIONS[fact.relation]]

    def facts_of(self, entities: list[str]) -> list[Fact]:
        chosen = set(entities)
        return [fact for fact in self.facts if fact.entity in chosen]

    def pretraining_texts(self) -> list[str]:
        """Statements (all languages for shared entities, `en` only for the others), English QA, the lexicons."""
        texts = [self.statement(fact, "en") for fact in self.facts]
        texts += [self.question(fact, "en") + self.answer(fact, "en") for fact in self.facts]
        for language in LOW_RESOURCE:
            texts += [self.statement(fact, language) for fact in self.facts_of(self.shared_entities)]
            texts += [f"{english} = {word}" for english, word in self.words[language].items()]
        return texts

    def qa_pairs(self, entities: list[str], languages=LOW_RESOURCE) -> list[dict[str, str]]:
        """Questions and answers in `languages` about `entities`, each with its English version as anchor."""
        rows = []
        for fact in self.facts_of(entities):
            for language in languages:
                rows.append(
                    {
                        "prompt": self.question(fact, language),
                        "completion": self.answer(fact, language),
                        "anchor_prompt": self.question(fact, "en"),
                        "anchor_completion": self.answer(fact, "en"),
                        "language": language,
                    }
                )
        return rows
