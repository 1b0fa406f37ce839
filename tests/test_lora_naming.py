"""splitwave.common.lora speaks peft's language: the factor keys peft saves, and the scaling peft applies."""

from __future__ import annotations

import pytest
from peft import get_peft_model_state_dict

from splitwave.common import lora
from splitwave.server.models import build_model
from splitwave.server.split import LoraSpec, split_model


def test_key_helpers():
    m = "base_model.model.h.0.attn.c_attn"
    assert lora.a_key(m) == m + ".lora_A.weight" and lora.b_key(m) == m + ".lora_B.weight"
    assert lora.factor_key(m, "A") == lora.a_key(m) and lora.factor_key(m, "B") == lora.b_key(m)
    assert lora.module_of(lora.a_key(m)) == lora.module_of(lora.b_key(m)) == m
    assert [lora.factor_kind(k) for k in (lora.a_key(m), lora.b_key(m), "score.weight")] == ["A", "B", None]
    with pytest.raises(ValueError, match="not a LoRA factor key"):
        lora.module_of("score.weight")
    modules, extras = lora.split_factors({lora.a_key(m): 1, lora.b_key(m): 2, "score.weight": 3})
    assert modules == {m: {"A": 1, "B": 2}} and extras == {"score.weight": 3}
    assert lora.scaling(8, 4) == 2.0 and lora.scaling(8, 4, rslora=True) == 4.0


@pytest.mark.parametrize("rslora", [False, True])
def test_names_and_scaling_are_peft_s(rslora):
    split = split_model(build_model("llama"), 1, LoraSpec(r=2, alpha=4, rslora=rslora))
    keys = set(get_peft_model_state_dict(split.peft_model))
    modules, extras = lora.split_factors(dict.fromkeys(keys))
    assert modules and not any(".lora_" in k for k in extras)
    named = dict(split.peft_model.named_modules())
    for m, ab in modules.items():
        assert set(ab) == {"A", "B"} and {lora.a_key(m), lora.b_key(m)} <= keys
        layer = named[m]  # the saved key's module is the peft LoRA layer itself
        assert layer.lora_A["default"].weight.shape[0] == 2
        assert layer.scaling["default"] == pytest.approx(lora.scaling(4, 2, rslora))


def test_peft_parameter_names_map_to_saved_keys():
    split = split_model(build_model("gpt2"), 1, LoraSpec(r=2, alpha=4))
    keys = set(get_peft_model_state_dict(split.peft_model))
    params = [n for n, _ in split.peft_model.named_parameters() if lora.is_factor_param(n)]
    assert params and {lora.saved_key(n, "default") for n in params} == {k for k in keys if lora.factor_kind(k)}
