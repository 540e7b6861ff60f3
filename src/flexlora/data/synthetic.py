"""A built-in multi-task set of small procedural tasks, one task per client, needing no download.

Client ``i`` gets task kind ``KINDS[i % len(KINDS)]`` (reverse words, sort numbers, add numbers, upper-case,
count vowels, first / last word, letter substitution, word problems, ...). Kinds with a parameter (the
number to add, the letters to swap, the sort order, ...) draw it per client, so clients beyond the first
``len(KINDS)`` get new variants. Each client has its own instruction and category, and every output is a
few tokens, learnable by a small model. Everything follows from ``seed``: the same seed gives the same
tasks and examples, and a client's examples are generated only when it is loaded.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flexlora.data.base import DEFAULT_CACHE_SIZE, ClientSource
from flexlora.data.checks import require_int
from flexlora.data.examples import ClientData, ClientInfo, Example
from flexlora.data.splits import DEFAULT_FRACTIONS, check_fractions, seeded_rng, split_counts, split_items

__all__ = ["SyntheticSource", "SyntheticTask", "KINDS", "make_task"]

MAX_CLIENTS = 100_000  # bounds the work a config can ask for
MAX_EXAMPLES_PER_CLIENT = 1_000_000

WORDS = (
    "cat dog sun red blue tree fish bird milk book cup hat pen box car bus egg map key lamp "
    "rain snow moon star ship road door bell cake corn frog lion wolf bear king rose sand salt"
).split()
POSITIVE = ("good", "happy", "great", "lovely", "nice", "sunny", "kind", "bright")
NEGATIVE = ("bad", "sad", "awful", "ugly", "rude", "gloomy", "cruel", "dull")
NAMES = ("Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo")
ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs")
VOWELS = set("aeiou")

Generator = Callable[[random.Random], tuple[str, str]]  # rng -> (input, output)


@dataclass(frozen=True)
class SyntheticTask:
    """One procedural task: its name, category, instruction and example generator."""

    task: str
    category: str
    instruction: str
    generate: Generator


def _words(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _numbers(rng: random.Random, count: int, high: int = 99) -> list[int]:
    return [rng.randint(0, high) for _ in range(count)]


def _joined(values: Sequence[object]) -> str:
    return " ".join(str(v) for v in values)


def _reverse_words(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        w = _words(r)
        return _joined(w), _joined(w[::-1])

    return SyntheticTask("reverse_words", "Sequence Manipulation", "Reverse the order of the words.", gen)


def _sort_numbers(rng: random.Random) -> SyntheticTask:
    descending = rng.random() < 0.5
    order = "descending" if descending else "ascending"

    def gen(r: random.Random) -> tuple[str, str]:
        n = _numbers(r, r.randint(3, 5))
        return _joined(n), _joined(sorted(n, reverse=descending))

    return SyntheticTask(
        f"sort_numbers {order}", "Sequence Manipulation", f"Sort the numbers in {order} order.", gen
    )


def _add_numbers(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        n = _numbers(r, r.randint(2, 3), high=20)
        return _joined(n), str(sum(n))

    return SyntheticTask("add_numbers", "Arithmetic", "Add the numbers and give the sum.", gen)


def _add_constant(rng: random.Random) -> SyntheticTask:
    k = rng.randint(2, 9)

    def gen(r: random.Random) -> tuple[str, str]:
        n = r.randint(0, 50)
        return str(n), str(n + k)

    return SyntheticTask(f"add_constant {k}", "Arithmetic", f"Add {k} to the number.", gen)


def _uppercase(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        w = _joined(_words(r, 1, 2))
        return w, w.upper()

    return SyntheticTask("uppercase", "Text Transformation", "Rewrite the text in capital letters.", gen)


def _count_vowels(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        w = r.choice(WORDS)
        return w, str(sum(c in VOWELS for c in w))

    return SyntheticTask("count_vowels", "Counting", "Count the vowels (a, e, i, o, u) in the word.", gen)


def _count_words(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        w = _words(r, 2, 7)
        return _joined(w), str(len(w))

    return SyntheticTask(
        "count_words", "Counting", "How many words are in the text? Answer with a number.", gen
    )


def _pick_word(rng: random.Random) -> SyntheticTask:
    position = rng.choice(("first", "last"))

    def gen(r: random.Random) -> tuple[str, str]:
        w = _words(r)
        return _joined(w), w[0] if position == "first" else w[-1]

    return SyntheticTask(f"{position}_word", "Extraction", f"Give the {position} word of the text.", gen)


def _substitute(rng: random.Random) -> SyntheticTask:
    old = rng.choice("aeio")
    new = rng.choice([c for c in "xyz" + old.upper() if c != old])

    def gen(r: random.Random) -> tuple[str, str]:
        w = [x for x in WORDS if old in x]
        text = _joined(r.sample(w, 2))
        return text, text.replace(old, new)

    return SyntheticTask(
        f"substitute {old}->{new}",
        "Text Transformation",
        f"Copy the text, replacing every '{old}' with '{new}'.",
        gen,
    )


def _word_problem(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        name, item = r.choice(NAMES), r.choice(ITEMS)
        a, b = r.randint(2, 12), r.randint(1, 9)
        if r.random() < 0.5:
            return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", str(
                a + b
            )
        a += b
        return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?", str(a - b)

    return SyntheticTask("word_problem", "Arithmetic Word Problems", "Solve the word problem.", gen)


def _max_number(rng: random.Random) -> SyntheticTask:
    largest = rng.random() < 0.5
    which = "largest" if largest else "smallest"

    def gen(r: random.Random) -> tuple[str, str]:
        n = r.sample(range(100), r.randint(3, 5))
        return _joined(n), str(max(n) if largest else min(n))

    return SyntheticTask(f"{which}_number", "Comparison", f"Give the {which} number.", gen)


def _parity(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        n = r.randint(0, 999)
        return str(n), "even" if n % 2 == 0 else "odd"

    return SyntheticTask(
        "parity", "Classification", "Is the number even or odd? Answer 'even' or 'odd'.", gen
    )


def _sentiment(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        positive = r.random() < 0.5
        adjective = r.choice(POSITIVE if positive else NEGATIVE)
        return f"a {adjective} {r.choice(WORDS)}", "positive" if positive else "negative"

    return SyntheticTask(
        "sentiment",
        "Sentiment Analysis",
        "Is the phrase positive or negative? Answer 'positive' or 'negative'.",
        gen,
    )


def _repeat_word(rng: random.Random) -> SyntheticTask:
    times = rng.randint(2, 3)

    def gen(r: random.Random) -> tuple[str, str]:
        w = r.choice(WORDS)
        return w, _joined([w] * times)

    return SyntheticTask(f"repeat_word {times}", "Text Transformation", f"Write the word {times} times.", gen)


def _next_letter(rng: random.Random) -> SyntheticTask:
    def gen(r: random.Random) -> tuple[str, str]:
        i = r.randrange(25)
        return string.ascii_lowercase[i], string.ascii_lowercase[i + 1]

    return SyntheticTask(
        "next_letter", "Sequence Manipulation", "Give the letter that follows this one in the alphabet.", gen
    )


KINDS: tuple[Callable[[random.Random], SyntheticTask], ...] = (
    _reverse_words,
    _sort_numbers,
    _add_numbers,
    _uppercase,
    _count_vowels,
    _pick_word,
    _substitute,
    _word_problem,
    _add_constant,
    _max_number,
    _parity,
    _sentiment,
    _count_words,
    _repeat_word,
    _next_letter,
)


def make_task(index: int, seed: int = 0) -> SyntheticTask:
    """The task of client ``index``: kind ``KINDS[index % len(KINDS)]``, parameters drawn from the seed."""
    return KINDS[index % len(KINDS)](seeded_rng(seed, "synthetic", "task", index))


class SyntheticSource(ClientSource):
    """The built-in procedural multi-task set; client ids are ``"0"``, ``"1"``, ...

    Args:
        num_clients: number of clients (one task each).
        examples_per_client: examples per client before the train / eval / test split.
        seed: seeds the tasks' parameters and examples.
        fractions: train / eval / test shares of each client's examples.
        cache_size: loaded clients kept in memory.

    Raises:
        ValueError: a bad option; the message names it.
    """

    format = "synthetic"

    def __init__(
        self,
        *,
        num_clients: int = 16,
        examples_per_client: int = 64,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        require_int("num_clients", num_clients, 1, MAX_CLIENTS)
        require_int("examples_per_client", examples_per_client, 1, MAX_EXAMPLES_PER_CLIENT)
        self.seed = seed
        self.examples_per_client = examples_per_client
        self.fractions = check_fractions(fractions)
        counts = split_counts(examples_per_client, self.fractions)
        self._tasks = {str(i): make_task(i, seed) for i in range(num_clients)}
        infos = {cid: ClientInfo(cid, t.task, t.category, *counts) for cid, t in self._tasks.items()}
        super().__init__(f"{self.format}(seed={seed})", infos, cache_size)

    def _read(self, client_id: str) -> ClientData:
        task = self._tasks[client_id]
        rng = seeded_rng(self.seed, "synthetic", "examples", client_id)
        examples = [
            Example(task.instruction, *task.generate(rng), category=task.category)
            for _ in range(self.examples_per_client)
        ]
        return ClientData(self.info(client_id), *split_items(examples, self.fractions))
