"""LoRA through the shared method checks (the pattern every method's tests follow)."""

import peft
import pytest

import peftx
from tests.integration.tiny_models import make
from tests.tuners import method_checks as mc


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_lora_keeps_the_method_promises(kind, tmp_path):
    model, inputs, task = make(kind)
    config = peftx.LoraConfig(task_type=task, r=4, lora_alpha=8)
    pm = mc.check_identity_at_init(model, inputs, config)
    mc.check_training_moves_every_adapter_param(pm, inputs)
    mc.check_save_load_exact(pm, model, inputs, tmp_path)
    mc.check_merge_matches(pm, inputs)
    mc.check_trainable_params_equal_hf(model, peftx.LoraConfig(task_type=task, r=4),
                                       peft.LoraConfig(task_type=task, r=4))
    mc.check_hf_round_trip(model, inputs, peftx.LoraConfig(task_type=task, r=4),
                           peft.LoraConfig(task_type=task, r=4), tmp_path)
