"""The verifiable task: seeded integer arithmetic with exact answers (the RL's Razor replication track).

Domains are the operations (add, sub, mul). Training and held-out problems come from one seeded stream
and never share a (a, op, b) triple. The worked answer ends in "The answer is N."; success is an exact
match of the last integer in a response.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}
SEED = 20261123  # the task's own seed: the problems are fixed, whatever the training seed


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
    def prompt(self) -> str:
        return f"What is {self.a} {self.symbol} {self.b}? Give the result as a number."

    def worked(self, value: int | None = None) -> str:
        value = self.answer if value is None else value
        return f"{self.a} {self.symbol} {self.b} = {value}. The answer is {value}."

    def wrong(self, rng: random.Random) -> int:
        delta = rng.choice([-10, -2, -1, 1, 2, 10])
        return self.answer + delta


def _draw(rng: random.Random, domain: str) -> tuple[int, int]:
    if domain == "mul":
        return rng.randint(2, 30), rng.randint(2, 30)
    return rng.randint(10, 999), rng.randint(10, 999)


def problems(n_train: int, n_heldout: int) -> tuple[list[Problem], list[Problem]]:
    rng = random.Random(SEED)
    seen: set[tuple[int, str, int]] = set()
    out: list[Problem] = []
    domains = list(OPS)
    while len(out) < n_train + n_heldout:
        domain = domains[len(out) % len(domains)]
        a, b = _draw(rng, domain)
        if (a, domain, b) in seen:
            continue
        seen.add((a, domain, b))
        out.append(Problem(id=f"arith-{len(out):05d}", domain=domain, a=a, b=b))
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
