"""Synthetic, seeded datasets for the demo adapters, and the checks that show their styles.

Every dataset comes from one small table of facts (capitals, colours, legs, sums, trivia), each with
an English question, an English sentence, a bare answer and a French sentence; a style renders the
answer:

- ``pirate``: the English sentence after ``"Arr, matey! "``;
- ``json``: compact JSON ``{"answer": <bare answer>}``;
- ``french``: the French sentence.

The questions in :data:`HELD_OUT` are never trained on, so a demo on them shows that a style
generalises rather than that a row was memorised. Nothing here imports torch.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

STYLES = ("pirate", "json", "french")
PIRATE_PREFIX = "Arr, matey!"
HELD_OUT = (
    "What is the capital of France?",
    "What color is the sky?",
    "How many legs does a spider have?",
    "What is 4 plus 3?",
    "Which planet is known as the Red Planet?",
)
# One fact per row, "|" between columns; all_facts() turns each table into questions and answers.
# country | capital | French "of the country" | French capital
_CAPITALS = """France|Paris|de la France|Paris
Germany|Berlin|de l'Allemagne|Berlin
Italy|Rome|de l'Italie|Rome
Spain|Madrid|de l'Espagne|Madrid
Japan|Tokyo|du Japon|Tokyo
Canada|Ottawa|du Canada|Ottawa
Egypt|Cairo|de l'Égypte|Le Caire
Russia|Moscow|de la Russie|Moscou
China|Beijing|de la Chine|Pékin
Portugal|Lisbon|du Portugal|Lisbonne
Greece|Athens|de la Grèce|Athènes
Poland|Warsaw|de la Pologne|Varsovie
Austria|Vienna|de l'Autriche|Vienne
Norway|Oslo|de la Norvège|Oslo
Ireland|Dublin|de l'Irlande|Dublin
Peru|Lima|du Pérou|Lima
Belgium|Brussels|de la Belgique|Bruxelles
Hungary|Budapest|de la Hongrie|Budapest
Turkey|Ankara|de la Turquie|Ankara
Australia|Canberra|de l'Australie|Canberra"""
# thing | colour | French sentence
_COLORS = """the sky|blue|Le ciel est bleu.
grass|green|L'herbe est verte.
snow|white|La neige est blanche.
a banana|yellow|Une banane est jaune.
coal|black|Le charbon est noir.
a tomato|red|Une tomate est rouge.
a carrot|orange|Une carotte est orange.
milk|white|Le lait est blanc.
a lemon|yellow|Un citron est jaune.
blood|red|Le sang est rouge."""
# animal | number of legs | French sentence
_LEGS = """a spider|8|Une araignée a huit pattes.
a dog|4|Un chien a quatre pattes.
a bird|2|Un oiseau a deux pattes.
a cat|4|Un chat a quatre pattes.
an ant|6|Une fourmi a six pattes.
a horse|4|Un cheval a quatre pattes.
a chicken|2|Une poule a deux pattes.
a bee|6|Une abeille a six pattes.
a cow|4|Une vache a quatre pattes."""
# question | English sentence | bare answer | French sentence
_TRIVIA = """What is the largest ocean?|The Pacific is the largest ocean.|the Pacific|Le Pacifique est le plus grand océan.
How many days are in a week?|A week has 7 days.|7|Une semaine a sept jours.
Who wrote Romeo and Juliet?|William Shakespeare wrote it.|William Shakespeare|William Shakespeare l'a écrit.
What is the largest planet?|Jupiter is the largest planet.|Jupiter|Jupiter est la plus grande planète.
How many continents are there?|There are 7 continents.|7|Il y a sept continents.
What do bees make?|Bees make honey.|honey|Les abeilles font du miel.
What is frozen water called?|Frozen water is called ice.|ice|L'eau gelée s'appelle la glace.
How many hours are in a day?|A day has 24 hours.|24|Un jour a vingt-quatre heures.
Which planet is known as the Red Planet?|Mars is the Red Planet.|Mars|Mars est la planète rouge.
Hello!|Hello! How can I help you today?|Hello! How can I help you today?|Bonjour ! Comment puis-je vous aider ?"""  # noqa: E501
# Common function words of each language (none in both), to tell French text from English text.
_FRENCH_WORDS = frozenset((
    "le", "la", "les", "l", "de", "du", "des", "un", "une", "est", "sont", "et", "font", "il", "y", "je",
    "vous", "ce", "qui", "que", "dans", "pour", "avec", "bonjour",
))  # fmt: skip
_ENGLISH_WORDS = frozenset((
    "the", "is", "are", "of", "has", "have", "and", "there", "it", "was", "this", "that", "to", "in",
    "with", "for", "you",
))  # fmt: skip


@dataclass(frozen=True)
class Fact:
    question: str  # English, as a user would ask it
    english: str  # a full English sentence
    bare: str | int  # the answer alone (an int for counts and sums): the JSON value
    french: str  # a full French sentence


def _rows(table: str) -> list[list[str]]:
    return [line.split("|") for line in table.splitlines()]


def _maybe_int(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def all_facts() -> list[Fact]:
    """Every fact, in a fixed order: capitals, colours, legs, sums 2..5 + 2..5, trivia."""
    facts = [
        Fact(
            f"What is the capital of {c}?",
            f"The capital of {c} is {city}.",
            city,
            f"La capitale {de} est {ville}.",
        )
        for c, city, de, ville in _rows(_CAPITALS)
    ]
    facts += [
        Fact(f"What color is {t}?", f"{t[0].upper()}{t[1:]} is {c}.", c, fr) for t, c, fr in _rows(_COLORS)
    ]
    facts += [
        Fact(f"How many legs does {a} have?", f"{a[0].upper()}{a[1:]} has {n} legs.", int(n), fr)
        for a, n, fr in _rows(_LEGS)
    ]
    facts += [
        Fact(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", a + b, f"{a} et {b} font {a + b}.")
        for a in range(2, 6)
        for b in range(2, 6)
    ]
    facts += [Fact(q, en, _maybe_int(bare), fr) for q, en, bare, fr in _rows(_TRIVIA)]
    return facts


def render_answer(style: str, fact: Fact) -> str:
    """The assistant's answer to ``fact.question`` in ``style`` (one of :data:`STYLES`)."""
    if style == "pirate":
        return f"{PIRATE_PREFIX} {fact.english}"
    if style == "json":
        return json.dumps({"answer": fact.bare}, ensure_ascii=False)
    if style == "french":
        return fact.french
    raise ValueError(f"unknown demo adapter {style!r}; choose from {', '.join(STYLES)}")


def build_examples(style: str, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs for every fact not in :data:`HELD_OUT`, shuffled with ``seed``.

    Deterministic: the same style and seed give the same list on every machine.
    """
    examples = [(f.question, render_answer(style, f)) for f in all_facts() if f.question not in HELD_OUT]
    random.Random(f"{style}:{seed}").shuffle(examples)
    return examples


def shows_style(style: str, answer: str) -> bool:
    """Whether a generated ``answer`` visibly has ``style``: the check tests and the command use.

    pirate: starts with ``"Arr, matey!"``; json: parses as a JSON object with an ``"answer"`` key;
    french: more common French words (le, est, et, …) than common English ones (the, is, and, …).
    """
    text = answer.strip()
    if style == "pirate":
        return text.startswith(PIRATE_PREFIX)
    if style == "json":
        try:
            parsed = json.loads(text)
        except ValueError:
            return False
        return isinstance(parsed, dict) and "answer" in parsed
    if style == "french":
        words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower())
        num_french = sum(w in _FRENCH_WORDS for w in words)
        return num_french > sum(w in _ENGLISH_WORDS for w in words)
    raise ValueError(f"unknown demo adapter {style!r}; choose from {', '.join(STYLES)}")
