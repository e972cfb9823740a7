"""A fixed text corpus for training the demo tokenizer, generated in code.

Deterministic by construction (a seeded `random.Random`, whose algorithm Python
guarantees across platforms), so the tokenizer trained on it is byte-identical on
every machine with the same `tokenizers` version, with no network and no reliance
on files that may differ between installations.
"""

from __future__ import annotations

import random
import string
from typing import Iterator

_WORDS = """
the of and to in is you that it he was for on are as with his they at be this have from or one had
by word but not what all were we when your can said there use an each which she do how their if will
up other about out many then them these so some her would make like him into time has look two more
write go see number no way could people my than first water been call who oil its now find long down
day did get come made may part model serve slot bundle version rollback deploy token request answer
question help hello world thanks please reply user assistant system prompt cache memory warm live
previous candidate traffic route guard metric error latency safe fast small tiny random test check
""".split()
_TEMPLATES = (
    "{A} {b} {c} {d}.",
    "{A} {b} {c}, {d} {e} {f}!",
    "Is {b} {c} {d}?",
    "{A} {b}: {c} {d} {e}.",
    "\"{A} {b},\" said the {c}.",
    "The {b} has {n} {c}s and {m} {d}s.",
    "{A}'s {b} isn't {c}; it's {d}.",
)
_SNIPPETS = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "x = {\"key\": [1, 2, 3], 'other': (4.5, -6)}\n",
    "if (a && b) || !c { return x[0] % 7; }\n",
    "https://example.com/path?q=1&r=two#frag\n",
    "<|user|> 2 + 2 = 4 # 100% ok ~ ^ $ @ ` \\ |\n",
    "<tag attr=\"v\">text</tag>\n",
)


def corpus_lines(n: int = 4000, seed: int = 1234) -> Iterator[str]:
    """Sentences over a small vocabulary plus code and every printable ASCII character."""
    rng = random.Random(seed)
    for i in range(n):
        w = [rng.choice(_WORDS) for _ in range(6)]
        line = rng.choice(_TEMPLATES).format(A=w[0].capitalize(), b=w[1], c=w[2], d=w[3], e=w[4], f=w[5],
                                             n=rng.randint(0, 999), m=rng.randint(0, 99))
        yield line
        if i % 50 == 0:
            yield rng.choice(_SNIPPETS)
    yield string.printable
