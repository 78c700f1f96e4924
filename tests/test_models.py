import time

import pytest

from study import models


def test_source_kinds():
    assert models.source_kind("bundled:smollm2-135m-instruct") == "bundled"
    assert models.source_kind("Qwen/Qwen2.5-3B-Instruct") == "hub"
    assert models.source_kind("tiny-random") == "tiny"
    assert models.source_kind("/definitely/not/here") == "local"
    assert models.source_kind("what is this") == "unknown"
    assert "bundled:" in models.check_source("bundled:nope")
    assert models.check_source("/definitely/not/here")


def test_offline_hub_model_fails_at_once_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(models.ModelUnavailable) as e:
        models.load_model("someorg/not-cached-model", models.resolve_runtime("cpu", "float32"))
    msg = str(e.value)
    assert "someorg/not-cached-model" in msg and "local directory" in msg
    assert time.time() - t < 30  # no retries against an unreachable hub


def test_runtime_defaults_to_machine(monkeypatch):
    """`auto` follows what the machine has: CUDA with bf16 when a GPU supports it, else the CPU in fp32 —
    checked against a faked GPU both ways, so a rule that ignores the machine fails."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: False)
    assert models.resolve_runtime() == models.Runtime("cpu", "float32")
    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: True)  # fp32 weights, bf16 autocast
    assert models.resolve_runtime() == models.Runtime("cpu", "float32", autocast="bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert models.resolve_runtime() == models.Runtime("cuda", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert models.resolve_runtime() == models.Runtime("cuda", "float32")
    assert models.resolve_runtime("cpu", "bfloat16") == models.Runtime("cpu", "bfloat16")  # explicit wins


def test_tiny_model_generates_and_scores():
    tok, model = models.tiny_tokenizer(), models.tiny_model()
    conv = [[{"role": "user", "content": "How do I boil an egg?"}]] * 3
    out = models.generate(model, tok, conv, max_new_tokens=5, batch_size=2)
    assert len(out) == 3 and out[0] == out[2]  # greedy is deterministic across batches
    lp = models.completion_logprobs(model, tok, conv, ["Boil it.", "Boil it for six minutes.", "Boil it."])
    assert lp[0][1] < lp[1][1] and abs(lp[0][0] - lp[2][0]) < 1e-4 and all(s < 0 for s, _ in lp)


def test_completion_logprobs_equal_one_sequence_at_a_time():
    """The batched, left-padded, last-columns-only scoring equals scoring each unpadded sequence alone."""
    import torch

    tok, model = models.tiny_tokenizer(), models.tiny_model()
    convs = [
        [{"role": "user", "content": q}] for q in ("How do I boil an egg?", "Why?", "Name a fish, any fish.")
    ]
    answers = ["Boil it for six minutes.", "Because the sky is wide and the sea is deep.", "Cod."]
    got = models.completion_logprobs(model, tok, convs, answers, batch_size=3)
    for conv, answer, (lp, n) in zip(convs, answers, got):
        prefix = tok(
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        a = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + a])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        ref = float(logp[len(prefix) - 1 :].gather(-1, ids[0, len(prefix) :, None]).sum())
        assert n == len(a) and abs(lp - ref) < 1e-4
