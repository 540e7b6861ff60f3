"""PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup, in time linear in the key and the module name.

PEFT (``peft.utils.other.get_pattern_key``) takes the first key ``K`` for which
``re.match(rf"(.*\\.)?({K})$", module)`` succeeds. A key comes from an untrusted ``adapter_config.json``, and
Python's backtracking engine can take exponential time on keys such as ``(a*)*b``.

A key without repeats or alternation cannot make Python's engine backtrack more than
``O(len(key) * len(name))``, so it is matched with ``re`` itself. Any other key is parsed into a Thompson NFA
and simulated state-set by state-set: ``O(states * len(name))`` whatever the key. ``(.*\\.)?`` is not
compiled: the NFA is started at position 0 and after every ``.`` of the name, exactly the positions where
that prefix can end. The syntax covered is what adapter configs use: literals and escapes, ``.``, classes
``[...]``, ``\\d \\w \\s`` (and negations), groups ``(...)`` / ``(?:...)``, ``|``, ``* + ?`` (lazy or not:
only whether it matches matters), ``{m}`` ``{m,}`` ``{,n}`` ``{m,n}``, and the anchors ``^`` ``$``. Anything
else (back-references, look-arounds, flags, named groups, stacked repeats) raises :class:`PatternError`, as
does a key nested deeper than :data:`MAX_DEPTH` or whose automaton exceeds :data:`MAX_STATES` states
(``(a{1000}){1000}``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "MAX_KEY_CHARS",
    "MAX_STATES",
    "CompiledKey",
    "MatchBudget",
    "PatternError",
    "compile_key",
    "key_matches",
]

MAX_KEY_CHARS = 1_000
MAX_STATES = 2_000
MAX_DEPTH = 50
_CLASSES: dict[str, Callable[[str], bool]] = {
    "d": str.isdecimal,
    "w": lambda c: c.isalnum() or c == "_",
    "s": str.isspace,
}


class PatternError(ValueError):
    """A pattern key uses syntax outside the supported subset, or is too large."""


@dataclass
class MatchBudget:
    """Matching work left for one config's lookups, in units: 1 per call, and 4 per NFA step (a state
    visited, epsilon moves included, or a character read), which costs about four times a whole ``re`` match
    of a simple key. Exhausting it raises :class:`PatternError`, so many keys times many modules stay
    bounded too."""

    left: int

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise PatternError("pattern keys need more matching work than accepted for one adapter")


@dataclass
class _State:
    """One NFA state: ``test`` consumes a character; otherwise ``eps`` lists epsilon moves; ``anchor`` is
    ``^`` or ``$`` for a zero-width assertion."""

    test: Callable[[str], bool] | None = None
    anchor: str = ""
    eps: list[_State] = field(default_factory=list)
    out: _State | None = None  # the state after a consumed character or a passed anchor


_Frag = tuple[_State, list[_State]]  # entry state, states whose exit is still to be connected


class _Parser:
    def __init__(self, key: str):
        self.key, self.i, self.states, self.depth = key, 0, 0, 0
        self.simple = True  # no repeat and no alternation: Python's engine cannot backtrack on it

    def new(self, **kw) -> _State:
        self.states += 1
        if self.states > MAX_STATES:
            raise PatternError(f"expands to more than {MAX_STATES} automaton states")
        return _State(**kw)

    def peek(self) -> str:
        return self.key[self.i] if self.i < len(self.key) else ""

    def take(self) -> str:
        c = self.peek()
        self.i += 1
        return c

    # alternation := concat ('|' concat)*
    def alternation(self) -> _Frag:
        frags = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            self.simple = False
            frags.append(self.concat())
        if len(frags) == 1:
            return frags[0]
        split = self.new(eps=[f[0] for f in frags])
        return split, [s for f in frags for s in f[1]]

    def concat(self) -> _Frag:
        start = self.new()
        entry, ends = start, [start]
        while self.peek() not in ("", "|", ")"):
            frag = self.repeat()
            _connect(ends, frag[0])
            ends = frag[1]
        return entry, ends

    def repeat(self) -> _Frag:
        begin = self.i
        frag = self.atom()
        text = self.key[begin : self.i]
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._is_brace()):
            if text in ("^", "$"):
                raise PatternError(f"nothing to repeat at position {self.i}")
            lo, hi = self.quantifier()
            self.simple = False
            if self.peek() == "?":  # lazy: same language
                self.i += 1
            if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._is_brace()):
                raise PatternError(f"stacked repeat at position {self.i} (possessive or multiple repeat)")
            frag = self.bounded(frag, text, lo, hi)
        return frag

    def _is_brace(self) -> bool:
        return self._is_brace_at(self.i)

    def _is_brace_at(self, i: int) -> bool:
        """Python reads ``{m}``, ``{m,}``, ``{,n}``, ``{m,n}`` as a repeat and any other ``{`` literally."""
        j = self.key.find("}", i)
        body = self.key[i + 1 : j] if j > 0 else "x"
        lo, comma, hi = body.partition(",")
        return (lo.isdigit() or (lo == "" and comma != "")) and (hi == "" or hi.isdigit())

    def quantifier(self) -> tuple[int, int | None]:
        c = self.take()
        if c in "*+?":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        j = self.key.index("}", self.i)
        lo, comma, hi = self.key[self.i : j].partition(",")
        self.i = j + 1
        low = int(lo or 0)
        high = low if not comma else (int(hi) if hi else None)
        if high is not None and high < low:
            raise PatternError(f"repeat {{{lo},{hi}}} has min > max")
        if low > MAX_STATES or (high or 0) > MAX_STATES:
            raise PatternError(f"repeat count beyond {MAX_STATES}")
        return low, high

    def bounded(self, frag: _Frag, text: str, lo: int, hi: int | None) -> _Frag:
        """``frag{lo,hi}`` by copying: the atom's text is re-parsed for each copy (states are counted)."""
        if hi == 0:
            empty = self.new()
            return empty, [empty]
        copies = [frag] + [_Parser._sub(self, text) for _ in range(max(lo, hi or lo + 1, 1) - 1)]
        entry = self.new()
        ends = [entry]
        for n, (e, outs) in enumerate(copies):
            if n < lo:
                _connect(ends, e)
                ends = outs
            elif hi is None:  # star over this copy
                loop = self.new()
                _connect(ends, loop)
                loop.eps.append(e)
                _connect(outs, loop)
                ends = [loop]
                break
            else:  # optional copy
                skip = self.new(eps=[e])
                _connect(ends, skip)
                ends = [skip, *outs]
        return entry, ends

    def _sub(self, text: str) -> _Frag:
        sub = _Parser(text)
        sub.states = self.states
        frag = sub.repeat()
        self.states = sub.states
        return frag

    def atom(self) -> _Frag:
        c = self.take()
        if c == "(":
            if self.key.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise PatternError(f"group syntax '(?{self.key[self.i + 1 : self.i + 2]}' is not supported")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise PatternError(f"groups nested deeper than {MAX_DEPTH}")
            frag = self.alternation()
            self.depth -= 1
            if self.take() != ")":
                raise PatternError("unbalanced parenthesis")
            return frag
        if c in ("^", "$"):
            s = self.new(anchor=c)
            return s, [s]
        if c == ".":
            return self.char(lambda x: x != "\n")
        if c == "[":
            return self.char(self.klass())
        if c == "\\":
            return self.char(self.escape())
        if c == "{" and not self._is_brace_at(self.i - 1):
            return self.char(c.__eq__)
        if c in ("*", "+", "?", "{", ")", ""):
            raise PatternError(f"unexpected {c or 'end'!r} at position {self.i - 1}")
        return self.char(c.__eq__)

    def char(self, test: Callable[[str], bool]) -> _Frag:
        s = self.new(test=test)
        return s, [s]

    def escape(self) -> Callable[[str], bool]:
        c = self.take()
        if c.lower() in _CLASSES:
            f = _CLASSES[c.lower()]
            return f if c.islower() else (lambda x: not f(x))
        if c and (c in string.punctuation or c == " "):
            return c.__eq__
        if c in ("n", "t"):
            return {"n": "\n", "t": "\t"}[c].__eq__
        raise PatternError(f"escape '\\{c}' is not supported")

    def klass(self) -> Callable[[str], bool]:
        negate = self.peek() == "^"
        self.i += negate
        tests: list[Callable[[str], bool]] = []
        first = True
        while True:
            c = self.take()
            if c == "":
                raise PatternError("unterminated character class")
            if c == "]" and not first:
                break
            first = False
            if c == "[" and self.peek() in ":=.":
                raise PatternError("POSIX classes are not supported")
            test = self.escape() if c == "\\" else None
            if test is None and self.peek() == "-" and self.key[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.take()
                if hi == "\\" or hi < c:
                    raise PatternError(f"bad range {c}-{hi}")
                tests.append(lambda x, a=c, b=hi: a <= x <= b)
            else:
                tests.append(test or c.__eq__)
        return (lambda x: not any(t(x) for t in tests)) if negate else (lambda x: any(t(x) for t in tests))


def _connect(ends: list[_State], target: _State) -> None:
    for s in ends:
        if s.test is None and not s.anchor:
            s.eps.append(target)
        else:
            s.out = target


@dataclass(frozen=True)
class CompiledKey:
    """A checked key: ``regex`` (Python's, for keys without repeats or alternation, which it matches in
    ``O(len(key) * len(name))``) or the NFA ``start`` / ``accept`` with its ``states`` count."""

    regex: re.Pattern | None
    start: _State | None
    accept: _State | None
    states: int


@lru_cache(maxsize=4096)
def compile_key(key: str) -> CompiledKey:
    """Parse ``key`` (which also checks it is inside the supported syntax) and compile it.

    Raises:
        PatternError: unsupported syntax, too long, nested too deep, or too many states.
    """
    if not isinstance(key, str):
        raise PatternError("not a string")
    if len(key) > MAX_KEY_CHARS:
        raise PatternError(f"longer than {MAX_KEY_CHARS} characters")
    parser = _Parser(key)
    start, ends = parser.alternation()
    if parser.i != len(key):
        raise PatternError(f"unexpected {key[parser.i]!r} at position {parser.i}")
    if parser.simple:
        try:
            return CompiledKey(re.compile(rf"(.*\.)?({key})$"), None, None, 0)
        except re.error as exc:
            raise PatternError(str(exc)) from None
    accept = parser.new()
    _connect(ends, accept)
    return CompiledKey(None, start, accept, parser.states)


def _closure(states: list[_State], pos: int, n: int, into: dict[int, _State]) -> int:
    """Add ``states`` and everything reachable by epsilon moves and anchors true at ``pos`` to ``into``;
    returns the steps taken (states popped)."""
    stack = list(states)
    steps = 0
    while stack:
        s = stack.pop()
        steps += 1
        if id(s) in into:
            continue
        into[id(s)] = s
        if s.anchor:
            if (s.anchor == "^" and pos == 0) or (s.anchor == "$" and pos == n):
                stack.append(s.out)
        else:
            stack.extend(s.eps)
    return steps


def key_matches(key: str, name: str, budget: MatchBudget | None = None) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", name) is not None``, without backtracking.

    Raises:
        PatternError: ``key`` is outside the supported syntax, or ``budget`` ran out.
    """
    compiled = compile_key(key)
    if budget is not None:
        budget.spend(1)
    if compiled.regex is not None:
        return compiled.regex.match(name) is not None
    start, accept = compiled.start, compiled.accept
    n = len(name)
    current: dict[int, _State] = {}
    _closure([start], 0, n, current)
    for pos, c in enumerate(name):
        nxt: dict[int, _State] = {}
        moved = [s.out for s in current.values() if s.test is not None and s.test(c)]
        if c == ".":
            moved.append(start)  # (.*\.)? may end here
        steps = _closure(moved, pos + 1, n, nxt)
        current = nxt
        if budget is not None:
            budget.spend(4 * (steps + 1))
    return id(accept) in current
