"""||ΔW||_F of a LoRA adapter, read with numpy, against the merged weight change computed by PEFT."""

import torch
from peft import LoraConfig, get_peft_model

from study.lora_norm import delta_norm
from study.models import tiny_model


def test_delta_norm_equals_merged_weight_change(tmp_path):
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    model.save_pretrained(tmp_path)
    value, modules = delta_norm(tmp_path)
    merged = model.merge_and_unload().state_dict()
    ref = sum(float(((merged[k] - before[k]).double() ** 2).sum()) for k in before if k in merged) ** 0.5
    assert modules > 0 and abs(value - ref) < 1e-5 * max(ref, 1.0)
    assert value > 0


def test_zero_adapter_has_zero_norm(tmp_path):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(tmp_path)  # PEFT initialises B = 0: no change yet
    assert delta_norm(tmp_path)[0] == 0.0
