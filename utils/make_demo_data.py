"""Writes `hf_sara/data/parallel_instructions.jsonl`, the embedded demo dataset.

The sentences are templates written for this project (Apache-2.0), filled with small arithmetic and world facts, in
English (the anchors) and four other languages: Swahili (sw), Hindi (hi), Bengali (bn) and Spanish (es).

    python utils/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "hf_sara" / "data" / "parallel_instructions.jsonl"
LANGUAGES = ("sw", "hi", "bn", "es")

ARITHMETIC = {
    "addition": {
        "en": ("What is {a} plus {b}?", "{a} plus {b} is {c}."),
        "sw": ("{a} jumlisha {b} ni ngapi?", "{a} jumlisha {b} ni {c}."),
        "hi": ("{a} और {b} का योग क्या है?", "{a} और {b} का योग {c} है।"),
        "bn": ("{a} যোগ {b} কত?", "{a} যোগ {b} হলো {c}।"),
        "es": ("¿Cuánto es {a} más {b}?", "{a} más {b} es {c}."),
    },
    "subtraction": {
        "en": ("What is {a} minus {b}?", "{a} minus {b} is {c}."),
        "sw": ("{a} toa {b} ni ngapi?", "{a} toa {b} ni {c}."),
        "hi": ("{a} में से {b} घटाने पर कितना बचता है?", "{a} में से {b} घटाने पर {c} बचता है।"),
        "bn": ("{a} বিয়োগ {b} কত?", "{a} বিয়োগ {b} হলো {c}।"),
        "es": ("¿Cuánto es {a} menos {b}?", "{a} menos {b} es {c}."),
    },
    "multiplication": {
        "en": ("What is {a} times {b}?", "{a} times {b} is {c}."),
        "sw": ("{a} mara {b} ni ngapi?", "{a} mara {b} ni {c}."),
        "hi": ("{a} गुणा {b} कितना होता है?", "{a} गुणा {b} {c} होता है।"),
        "bn": ("{a} গুণ {b} কত?", "{a} গুণ {b} হলো {c}।"),
        "es": ("¿Cuánto es {a} por {b}?", "{a} por {b} es {c}."),
    },
}
OPERATIONS = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b, "multiplication": lambda a, b: a * b}

CAPITALS = {
    "en": ("What is the capital of {country}?", "The capital of {country} is {city}."),
    "sw": ("Mji mkuu wa {country} ni upi?", "Mji mkuu wa {country} ni {city}."),
    "hi": ("{country} की राजधानी क्या है?", "{country} की राजधानी {city} है।"),
    "bn": ("{country}-এর রাজধানী কী?", "{country}-এর রাজধানী {city}।"),
    "es": ("¿Cuál es la capital de {country}?", "La capital de {country} es {city}."),
}
COUNTRIES = [  # (country, city) per language: en, sw, hi, bn, es
    (("Kenya", "Nairobi"), ("Kenya", "Nairobi"), ("केन्या", "नैरोबी"), ("কেনিয়া", "নাইরোবি"), ("Kenia", "Nairobi")),
    (
        ("India", "New Delhi"),
        ("India", "New Delhi"),
        ("भारत", "नई दिल्ली"),
        ("ভারত", "নয়াদিল্লি"),
        ("India", "Nueva Delhi"),
    ),
    (("Japan", "Tokyo"), ("Japani", "Tokyo"), ("जापान", "टोक्यो"), ("জাপান", "টোকিও"), ("Japón", "Tokio")),
    (("France", "Paris"), ("Ufaransa", "Paris"), ("फ़्रांस", "पेरिस"), ("ফ্রান্স", "প্যারিস"), ("Francia", "París")),
    (("Egypt", "Cairo"), ("Misri", "Kairo"), ("मिस्र", "काहिरा"), ("মিশর", "কায়রো"), ("Egipto", "El Cairo")),
    (("Nepal", "Kathmandu"), ("Nepal", "Kathmandu"), ("नेपाल", "काठमांडू"), ("নেপাল", "কাঠমান্ডু"), ("Nepal", "Katmandú")),
    (
        ("Tanzania", "Dodoma"),
        ("Tanzania", "Dodoma"),
        ("तंज़ानिया", "डोडोमा"),
        ("তানজানিয়া", "ডোডোমা"),
        ("Tanzania", "Dodoma"),
    ),
    (("Peru", "Lima"), ("Peru", "Lima"), ("पेरू", "लीमा"), ("পেরু", "লিমা"), ("Perú", "Lima")),
]

COLORS = [  # (question, answer) per language: en, sw, hi, bn, es
    (
        ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
        ("Anga lina rangi gani siku isiyo na mawingu?", "Anga ni la buluu siku isiyo na mawingu."),
        ("साफ़ दिन में आसमान का रंग क्या होता है?", "साफ़ दिन में आसमान नीला होता है।"),
        ("পরিষ্কার দিনে আকাশের রং কী?", "পরিষ্কার দিনে আকাশের রং নীল।"),
        ("¿De qué color es el cielo en un día despejado?", "El cielo es azul en un día despejado."),
    ),
    (
        ("What color is fresh grass?", "Fresh grass is green."),
        ("Nyasi mbichi zina rangi gani?", "Nyasi mbichi zina rangi ya kijani."),
        ("ताज़ी घास का रंग क्या होता है?", "ताज़ी घास हरी होती है।"),
        ("তাজা ঘাসের রং কী?", "তাজা ঘাসের রং সবুজ।"),
        ("¿De qué color es la hierba fresca?", "La hierba fresca es verde."),
    ),
    (
        ("What color is milk?", "Milk is white."),
        ("Maziwa yana rangi gani?", "Maziwa yana rangi nyeupe."),
        ("दूध का रंग क्या होता है?", "दूध सफ़ेद होता है।"),
        ("দুধের রং কী?", "দুধের রং সাদা।"),
        ("¿De qué color es la leche?", "La leche es blanca."),
    ),
    (
        ("What color is coal?", "Coal is black."),
        ("Makaa ya mawe yana rangi gani?", "Makaa ya mawe yana rangi nyeusi."),
        ("कोयले का रंग क्या होता है?", "कोयला काला होता है।"),
        ("কয়লার রং কী?", "কয়লার রং কালো।"),
        ("¿De qué color es el carbón?", "El carbón es negro."),
    ),
    (
        ("What color is a ripe banana?", "A ripe banana is yellow."),
        ("Ndizi mbivu ina rangi gani?", "Ndizi mbivu ina rangi ya njano."),
        ("पके केले का रंग क्या होता है?", "पका केला पीला होता है।"),
        ("পাকা কলার রং কী?", "পাকা কলার রং হলুদ।"),
        ("¿De qué color es un plátano maduro?", "Un plátano maduro es amarillo."),
    ),
    (
        ("What color is blood?", "Blood is red."),
        ("Damu ina rangi gani?", "Damu ina rangi nyekundu."),
        ("खून का रंग क्या होता है?", "खून लाल होता है।"),
        ("রক্তের রং কী?", "রক্তের রং লাল।"),
        ("¿De qué color es la sangre?", "La sangre es roja."),
    ),
]

LEGS = {
    "en": ("How many legs does {animal} have?", "{Animal} has {n} legs."),
    "sw": ("{animal} ana miguu mingapi?", "{Animal} ana miguu {n}."),
    "hi": ("{animal} के कितने पैर होते हैं?", "{Animal} के {n} पैर होते हैं।"),
    "bn": ("{animal}র কয়টি পা আছে?", "{Animal}র {n}টি পা আছে।"),
    "es": ("¿Cuántas patas tiene {animal}?", "{Animal} tiene {n} patas."),
}
ANIMALS = [  # number of legs, then the animal per language: en, sw, hi, bn, es
    (4, "a dog", "Mbwa", "कुत्ते", "কুকুরে", "un perro"),
    (2, "a bird", "Ndege", "पक्षी", "পাখি", "un pájaro"),
    (8, "a spider", "Buibui", "मकड़ी", "মাকড়সা", "una araña"),
    (4, "a cow", "Ng'ombe", "गाय", "গরু", "una vaca"),
    (6, "an ant", "Sisimizi", "चींटी", "পিঁপড়া", "una hormiga"),
    (2, "a chicken", "Kuku", "मुर्गी", "মুরগি", "una gallina"),
]
LANGUAGE_INDEX = {"en": 0, "sw": 1, "hi": 2, "bn": 3, "es": 4}


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def items(rng: random.Random) -> list[dict[str, dict[str, str]]]:
    """Each item: its category and, per language (English included), a prompt and a completion."""
    result = []
    for category, templates in ARITHMETIC.items():
        for _ in range(16):
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            if category == "subtraction" and b > a:
                a, b = b, a
            c = OPERATIONS[category](a, b)
            texts = {lang: (q.format(a=a, b=b), r.format(a=a, b=b, c=c)) for lang, (q, r) in templates.items()}
            result.append({"category": category, "texts": texts})
    for names in COUNTRIES:
        texts = {}
        for lang, (question, answer) in CAPITALS.items():
            country, city = names[LANGUAGE_INDEX[lang]]
            texts[lang] = (question.format(country=country), answer.format(country=country, city=city))
        result.append({"category": "capitals", "texts": texts})
    for pairs in COLORS:
        result.append({"category": "colors", "texts": {lang: pairs[i] for lang, i in LANGUAGE_INDEX.items()}})
    for legs, *animals in ANIMALS:
        texts = {}
        for lang, (question, answer) in LEGS.items():
            animal = animals[LANGUAGE_INDEX[lang]]
            texts[lang] = (
                question.format(animal=animal),
                answer.format(Animal=_capitalised(animal), animal=animal, n=legs),
            )
        result.append({"category": "legs", "texts": texts})
    return result


def main() -> None:
    rng = random.Random(0)
    rows = []
    for item in items(rng):
        english_prompt, english_completion = item["texts"]["en"]
        for language in LANGUAGES:
            prompt, completion = item["texts"][language]
            rows.append(
                {
                    "language": language,
                    "category": item["category"],
                    "prompt": prompt,
                    "completion": " " + completion,
                    "anchor_prompt": english_prompt,
                    "anchor_completion": " " + english_completion,
                }
            )
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    with OUTPUT.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"Wrote {len(rows)} pairs to {OUTPUT}")


if __name__ == "__main__":
    main()
