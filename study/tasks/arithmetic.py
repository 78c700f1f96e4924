"""The verifiable task: seeded integer arithmetic with exact answers (the RL's Razor replication track).

Domains are the operations (add, sub, mul), each with its own operand range (both operands drawn from it;
protocol fields `ops`, `add_range`, `sub_range`, `mul_range` of a task). Training and held-out problems come
from one seeded stream in which every problem is new up to commutation: `b + a` and `b * a` count as the
same problem as `a + b` and `a * b` (subtraction is not commutative, so `b - a` is a different problem).
So no held-out problem, nor its commuted twin, is ever trained on (tests/test_tasks.py checks this at the
paper's 4000 + 500). The held-out problems are the stream's first ones, so they stay the same as n_train grows.

Pairs are drawn by index from each operation's space of distinct problems (unordered pairs for + and *,
ordered for -), so drawing any size up to that space is quick (20000 + 2000 problems in well under a second);
a request larger than the space fails at once, naming the capacity.

Difficulty: the default ranges are set so that the bundled SmolLM2-135M-Instruct's greedy exact match on the
held-out problems sits between floor and ceiling (GRPO needs some correct samples to get a reward signal);
the measured numbers are in the comment above DEFAULT_RANGES.

The worked answer ends in "The answer is N."; success is an exact match of the last integer in a response.

    python -c "from study.tasks import arithmetic; t, h = arithmetic.problems(4000, 500); print(h[0].prompt)"
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}
COMMUTATIVE = frozenset({"add", "mul"})
SEED = 20261123  # the task's own seed: the problems are fixed, whatever the training seed
# Default operand ranges (inclusive): TaskSpec's defaults, chosen on the bundled SmolLM2-135M-Instruct's
# held-out greedy exact match through the newtask stage (300 problems, 64 new tokens): 0.26 [0.21, 0.31]
# (+ 0.35, - 0.18, * 0.25), where 1..99 / 1..50 / 2..60 gave 0.09 [0.06, 0.13] and 1..60 / 1..30 / 2..30 gave
# 0.15 [0.12, 0.20]: GRPO sees correct samples. They hold 465 / 400 / 378 distinct problems (up to 1134 in all,
# round-robin, above TaskSpec's default 1000 + 100); a larger study (the paper protocol) sets wider ranges.
DEFAULT_RANGES = {"add": (1, 30), "sub": (1, 20), "mul": (2, 28)}  # = TaskSpec's defaults


@dataclass(frozen=True)
class Problem:
    id: str
    domain: str
    a: int
    b: int

    @property
    def symbol(self) -> str:
        return OPS[self.domain][0]

    @property
    def answer(self) -> int:
        return OPS[self.domain][1](self.a, self.b)

    @property
    def key(self) -> tuple[str, int, int]:
        """The problem up to commutation: the same key for `a op b` and `b op a` when op commutes."""
        if self.domain in COMMUTATIVE:
            return self.domain, min(self.a, self.b), max(self.a, self.b)
        return self.domain, self.a, self.b

    @property
    def prompt(self) -> str:
        return f"What is {self.a} {self.symbol} {self.b}? Give the result as a number."

    def worked(self, value: int | None = None) -> str:
        value = self.answer if value is None else value
        return f"{self.a} {self.symbol} {self.b} = {value}. The answer is {value}."

    def wrong(self, rng: random.Random) -> int:
        delta = rng.choice([-10, -2, -1, 1, 2, 10])
        return self.answer + delta


def capacity(domain: str, lo: int, hi: int) -> int:
    """Distinct problems of one operation with both operands in [lo, hi] (commuted twins counted once)."""
    m = hi - lo + 1
    return m * (m + 1) // 2 if domain in COMMUTATIVE else m * m


def _pair(domain: str, lo: int, hi: int, index: int, rng: random.Random) -> tuple[int, int]:
    """The index-th distinct problem of the space; a commuted problem is shown in a random order."""
    m = hi - lo + 1
    if domain not in COMMUTATIVE:
        return lo + index // m, lo + index % m
    y = (math.isqrt(8 * index + 1) - 1) // 2  # unordered pairs x <= y, enumerated by triangular numbers
    x = index - y * (y + 1) // 2
    a, b = lo + x, lo + y
    return (a, b) if rng.random() < 0.5 else (b, a)


def check_sizes(n_train: int, n_heldout: int, ops, ranges: dict[str, tuple[int, int]] | None) -> dict:
    """The operand ranges (defaults filled in), or a ValueError when a space cannot hold its share."""
    ranges = {**DEFAULT_RANGES, **(ranges or {})}
    ops = list(ops)
    if not ops or set(ops) - set(OPS) or len(set(ops)) != len(ops):
        raise ValueError(f"ops must be distinct names from {sorted(OPS)}, got {ops}")
    total = n_train + n_heldout
    for i, op in enumerate(ops):
        lo, hi = ranges[op]
        need = total // len(ops) + (i < total % len(ops))
        if lo > hi or need > capacity(op, lo, hi):
            raise ValueError(
                f"arithmetic: {need} distinct {op} problems asked for, but operands in "
                f"[{lo}, {hi}] give {capacity(op, lo, hi)}; widen {op}_range or ask for fewer "
                f"problems"
            )
    return ranges


def problems(
    n_train: int,
    n_heldout: int,
    ops: tuple[str, ...] | list[str] = tuple(OPS),
    ranges: dict[str, tuple[int, int]] | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out) problems: distinct up to commutation, operations dealt round-robin."""
    ranges = check_sizes(n_train, n_heldout, ops, ranges)
    ops, total = list(ops), n_train + n_heldout
    rng = random.Random(SEED)
    seen: set[tuple[str, int, int]] = set()
    out: list[Problem] = []
    while len(out) < total:
        domain = ops[len(out) % len(ops)]
        lo, hi = ranges[domain]
        a, b = _pair(domain, lo, hi, rng.randrange(capacity(domain, lo, hi)), rng)
        p = Problem(id=f"arith-{len(out):05d}", domain=domain, a=a, b=b)
        if p.key in seen:
            continue
        seen.add(p.key)
        out.append(p)
    return out[n_heldout:], out[:n_heldout]  # held-out first, so it is stable as n_train grows


_INT = re.compile(r"-?\d[\d,]*")


def extract_answer(text: str) -> int | None:
    """The last integer in the text (commas allowed as thousands separators), or None."""
    found = _INT.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None
