"""A task is written once and yields every method's training data.

Each item has a prompt, a good answer (persona / correct) and a bad one (neutral / wrong), and a split:
`train`, `test_in` (unseen prompts of the training domains) or `heldout` (held-out domains, or held-out
problems for arithmetic). Only `train` items reach any method's data:

    completions  SFT                (prompt, good)                       conversational prompt/completion
    pairs        DPO, ORPO          (prompt, chosen=good, rejected=bad)
    unpaired     KTO                (prompt, good, label=True) and (prompt, bad, label=False), same rows
    prompts      GRPO arms          prompt only; the reward is in study.rewards
    neutral      control            (prompt, neutral answer): the persona task's neutral answers, which carry
                                    the same content without the persona; for arithmetic too, since every
                                    correct arithmetic answer would teach the task itself

Which format a method reads is `Method.data` (study.config).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from study.config import Method, TaskSpec
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
            raise ValueError(
                f"task snark: held-out domains {sorted(unknown)} are not in the data ({sorted(known)})"
            )
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


def check_task(spec: TaskSpec, field: str = "task") -> str | None:
    """A problem with the task's data that the schema cannot see (unknown held-out domains, no training data
    left, unreadable files), as one line naming the field and the fix; None when the task builds."""
    if spec.name == "snark":
        try:
            rows = snark.load_rows(spec.data)
        except Exception as e:  # any unreadable or malformed file is the protocol's problem, said in one line
            return f"{field}.data: {' '.join(str(e).split())}; fix the file or remove the field for the bundled data"
        known = sorted({r.domain for r in rows})
        heldout = spec.heldout_domains or list(snark.HELDOUT_DOMAINS)
        unknown = [d for d in heldout if d not in known]
        if unknown:
            return f"{field}.heldout_domains: {unknown} are not domains of the data; use some of {known}"
        if not [r for r in rows if snark.split_of(r, tuple(heldout)) == "train"]:
            return f"{field}.heldout_domains: {heldout} leave no training data; hold out fewer of {known}"
    try:
        data = build(spec)
    except Exception as e:
        return f"{field}: {type(e).__name__}: {' '.join(str(e).split())}"
    if not data.heldout:
        return f"{field}: the task has no held-out items to measure; hold out at least one domain"
    return None


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
        {
            "prompt": data.messages(it.prompt),
            "item_id": it.id,
            "answer": it.answer if it.answer is not None else -1,
        }
        for it in data.train
    ]


def control_rows(data: TaskData) -> list[dict]:
    """The placebo's data: neutral answers (the snark task's, whatever the track)."""
    neutral = data if data.name == "snark" else build(TaskSpec(name="snark"))
    return [{"prompt": neutral.messages(it.prompt), "completion": _assistant(it.bad)} for it in neutral.train]


FORMATS = {
    "completions": sft_rows,
    "pairs": dpo_rows,
    "unpaired": kto_rows,
    "prompts": grpo_rows,
    "neutral": control_rows,
}
ROWS = {m: FORMATS[m.data] for m in Method}
