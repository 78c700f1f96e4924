"""The KL drift stage on a tiny random model: zero for an untouched adapter, agreeing with a Monte-Carlo
log-ratio estimate drawn by an independent sampler, growing with the adapter's scale, padding-invariant."""

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from study.config import TaskSpec
from study.measure import kl
from study.models import tiny_model, tiny_tokenizer
from study.tasks import build

NAMES = {m + s for m in kl.METRICS for s in ("", "_per_token")}
SMALL = kl.KLEval(n_prompts=6, max_new_tokens=10, n_general=4, max_length_general=40)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data():
    return build(TaskSpec(name="snark"))


def lora(perturb: float = 0.0):
    """A tiny model with a LoRA adapter: lora_B as initialised (zero), or set to N(0, 1) * perturb."""
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.eval()
    if perturb:
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * perturb
    return model


def chat_ids(tok, text):
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(chat, add_special_tokens=False)["input_ids"]


def by_metric(result):
    return {r["metric"]: r for r in result["rows"]}


def test_untouched_adapter_has_zero_kl(tok, data):
    result = kl.run(lora(), tok, data, SMALL)
    rows = by_metric(result)
    assert set(rows) == NAMES
    for r in rows.values():
        assert 0 <= r["value"] < 1e-5 and r["n"] > 0
    assert all(abs(s["kl"]) < 1e-5 for s in result["sequences"])


def test_rows_are_well_formed(tok, data):
    result = kl.run(lora(0.5), tok, data, SMALL)
    rows = by_metric(result)
    assert set(rows) == NAMES
    for r in rows.values():
        assert r["value"] > 0.01, r  # a perturbed adapter drifts visibly
        assert r["ci_low"] - 1e-12 <= r["value"] <= r["ci_high"] + 1e-12, r
    assert rows["kl/forward_newtask"]["n"] == SMALL.n_prompts and rows["kl/forward_general"]["n"] == 4
    sampled = [s for s in result["sequences"] if s["metric"] != "kl/forward_general"]
    assert all(0 < s["tokens"] <= SMALL.max_new_tokens == 10 for s in sampled)
    assert all(len(s["token_kl"]) == s["tokens"] and min(s["token_kl"]) >= 0 for s in result["sequences"])
    assert result["timing"]["tokens_sampled"] > 0


def test_exact_kl_agrees_with_monte_carlo_from_generate(tok):
    """Exact estimator on our sampler's y ~ π0 (left-padded next to a longer prompt) against the plain log
    ratio log π0(y) − log πθ(y) on y ~ π0 drawn by HF `generate` with the full softmax (top_k=0): a wrong
    sampler or a wrong KL would both show."""
    model = lora(0.5)
    ids = chat_ids(tok, "Why is the sky blue?")
    longer = chat_ids(tok, "Tell me about the long history of Rome and its empire")
    assert len(longer) > len(ids)
    n, cfg, eos = 512, kl.KLEval(max_new_tokens=6, batch_size=1024), {tok.eos_token_id}
    with torch.no_grad():
        with model.disable_adapter():
            ys = kl._sample(model, [ids, longer] * n, cfg, eos, tok.pad_token_id, seed=0)[::2]
        scored = kl._score(model, [ids + y for y in ys], [len(y) for y in ys], True, cfg, tok.pad_token_id)
        exact = np.mean([s["kl"] for s in scored])

        torch.manual_seed(123)
        prompts = torch.tensor([ids] * n)
        with model.disable_adapter():
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=6,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )

        def logp(seqs):  # per generated token; the prompt is unpadded and generate pads only after an EOS
            logits = model(input_ids=seqs).logits[:, len(ids) - 1 : -1].float()
            return torch.log_softmax(logits, -1).gather(-1, seqs[:, len(ids) :, None])[..., 0]

        with model.disable_adapter():
            base = logp(out)
        is_eos = (out[:, len(ids) :] == tok.eos_token_id).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0
        ratio = ((base - logp(out)) * ~after_eos).sum(-1).numpy()
    half = 1.96 * ratio.std(ddof=1) / np.sqrt(n)
    assert exact > 0.05
    assert abs(exact - ratio.mean()) <= half, (exact, ratio.mean(), half)


def test_kl_grows_with_adapter_scale(tok, data):
    # a small perturbation: a large one saturates (RMSNorm rescales a residual stream the adapter dominates)
    model, cfg = lora(0.05), SMALL.model_copy(update={"n_prompts": 4, "max_new_tokens": 8, "n_general": 3})
    original = {name: p.data.clone() for name, p in model.named_parameters() if "lora_B" in name}
    values, texts = [], []
    for s in [0.0, 0.25, 0.5, 0.75, 1.0]:
        for name, p in model.named_parameters():
            if name in original:
                p.data = original[name] * s
        result = kl.run(model, tok, data, cfg)
        values.append(by_metric(result))
        texts.append([r["text"] for r in result["sequences"] if r["metric"] == "kl/forward_newtask"])
    assert all(t == texts[0] for t in texts)  # the same y ~ π0 at every scale
    for metric in sorted(NAMES):  # reverse too: its y ~ πθ change with the scale, but the gaps are wide
        curve = [v[metric]["value"] for v in values]
        assert curve[0] < 1e-6 and all(a < b for a, b in pairwise(curve)), (metric, curve)


def test_scoring_is_padding_invariant(tok):
    """A sequence scored in a left-padded batch next to longer ones gets the KL it gets alone."""
    model, cfg = lora(0.5), kl.KLEval()
    texts = ("Rivers carry water to the sea.", "A short one.", "The heart has four chambers and pumps blood.")
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_scored = [3, 2, 5]
    with torch.no_grad():
        together = kl._score(model, seqs, n_scored, True, cfg, tok.pad_token_id)
        alone = [
            kl._score(model, [s], [k], True, cfg, tok.pad_token_id)[0]
            for s, k in zip(seqs, n_scored, strict=True)
        ]
    for a, b in zip(together, alone, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
        assert a["log_ratio"] == pytest.approx(b["log_ratio"], abs=1e-4)


def test_base_without_adapter_reports_zero(tok, data):
    rows = kl.run(tiny_model(), tok, data, SMALL)["rows"]
    assert {r["metric"] for r in rows} == NAMES
    assert all(r["value"] == 0.0 for r in rows)


def test_general_text_file():
    rows = [json.loads(line) for line in kl.GENERAL_TEXT.read_text().splitlines()]
    assert len(rows) >= 40 and len({r["id"] for r in rows}) == len(rows)
    assert all(60 <= len(r["text"].split()) <= 120 for r in rows)
    assert len(kl.general_passages(kl.KLEval())) == 32


def test_config_rejects_unknown_fields():
    assert kl.KLEval().n_prompts == 32
    with pytest.raises(ValueError):
        kl.KLEval(n_prompt=3)
