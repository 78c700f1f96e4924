"""A task is written once and yields every method's training data.

Each item has a prompt, a good answer (persona / correct) and a bad one (neutral / wrong), and a split:
`train`, `test_in` (unseen prompts of the training domains) or `heldout` (held-out domains, or held-out
problems for arithmetic). Only `train` items reach any method's data:

    SFT   (prompt, good)                                    conversational prompt/completion
    DPO   (prompt, chosen=good, rejected=bad)
    KTO   (prompt, good, label=True) and (prompt, bad, label=False): balanced, from the same rows
    GRPO  prompt only; the reward is in study.rewards
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from study.protocol import Method, TaskSpec
from study.tasks import arithmetic, snark


@dataclass(frozen=True)
class Item:
    id: str
    domain: str
    prompt: str
    good: str
    bad: str
    split: str
    answer: int | None = None  # arithmetic only


@dataclass(frozen=True)
class TaskData:
    name: str
    items: tuple[Item, ...]
    system_prompt: str | None = None

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    @property
    def train(self) -> list[Item]:
        return self.split("train")

    @property
    def heldout(self) -> list[Item]:
        return self.split("heldout")

    def messages(self, prompt: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]


def build(spec: TaskSpec) -> TaskData:
    if spec.name == "snark":
        heldout = tuple(spec.heldout_domains or snark.HELDOUT_DOMAINS)
        rows = snark.load_rows(spec.data)
        known = {r.domain for r in rows}
        unknown = set(heldout) - known
        if unknown:
            raise ValueError(f"task snark: held-out domains {sorted(unknown)} are not in the data ({sorted(known)})")
        items = tuple(
            Item(r.id, r.domain, r.prompt, r.persona, r.neutral, snark.split_of(r, heldout)) for r in rows
        )
    elif spec.name == "arithmetic":
        ranges = {"add": spec.add_range, "sub": spec.sub_range, "mul": spec.mul_range}
        train, held = arithmetic.problems(spec.n_train, spec.n_heldout, spec.ops, ranges)
        rng = random.Random(arithmetic.SEED + 1)
        items = tuple(
            Item(p.id, p.domain, p.prompt, p.worked(), p.worked(p.wrong(rng)), split, p.answer)
            for split, group in (("heldout", held), ("train", train))
            for p in group
        )
    else:  # the protocol schema already restricts names
        raise ValueError(f"unknown task {spec.name!r}")
    return TaskData(spec.name, items, spec.system_prompt)


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_rows(data: TaskData) -> list[dict]:
    return [{"prompt": data.messages(it.prompt), "completion": _assistant(it.good)} for it in data.train]


def dpo_rows(data: TaskData) -> list[dict]:
    return [
        {"prompt": data.messages(it.prompt), "chosen": _assistant(it.good), "rejected": _assistant(it.bad)}
        for it in data.train
    ]


def kto_rows(data: TaskData) -> list[dict]:
    rows = []
    for it in data.train:
        rows.append({"prompt": data.messages(it.prompt), "completion": _assistant(it.good), "label": True})
        rows.append({"prompt": data.messages(it.prompt), "completion": _assistant(it.bad), "label": False})
    return rows


def grpo_rows(data: TaskData) -> list[dict]:
    return [
        {"prompt": data.messages(it.prompt), "item_id": it.id, "answer": it.answer if it.answer is not None else -1}
        for it in data.train
    ]


ROWS = {Method.sft: sft_rows, Method.dpo: dpo_rows, Method.kto: kto_rows, Method.grpo: grpo_rows}
