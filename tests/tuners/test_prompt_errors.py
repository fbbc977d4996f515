"""Bad input to the prompt-learning methods fails early with errors that say what to change; and the
prefix-tuning cache interface (used by methods built on prefix tuning) on its own."""

import peft
import pytest
import torch
from torch import nn

import peftx
from peftx.tuners.prefix_tuning import PrefixEncoder, prefix_cache, prefix_forward_kwargs
from tests.integration.tiny_models import logits, make, twin
from tests.tuners.method_checks import randomize_adapter


@pytest.fixture(autouse=True)
def _quiet(recwarn):
    pass


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def test_config_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        peftx.PromptTuningConfig()
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        peftx.PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="num_transformer_submodules must be 1, 2 or None"):
        peftx.PrefixTuningConfig(num_virtual_tokens=2, num_transformer_submodules=3)
    with pytest.raises(ValueError, match="init_weights must be None or 'zero'"):
        peftx.PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")
    with pytest.raises(ValueError, match="encoder_reparameterization_type must be 'MLP' or 'LSTM'"):
        peftx.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout must be in"):
        peftx.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.5)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        peftx.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=0)
    with pytest.raises(ValueError, match="task_type must be one of"):
        peftx.PromptTuningConfig(num_virtual_tokens=2, task_type="TRANSLATION")


def test_prefix_tuning_needs_a_model_with_a_cache():
    with pytest.raises(ValueError, match=r"could not read \['num_layers', 'token_dim', 'num_attention_heads'\].*set "
                                         r"num_layers=, token_dim=, num_attention_heads="):
        peftx.get_peft_model(Plain(), peftx.PrefixTuningConfig(num_virtual_tokens=2))
    dims = dict(num_layers=1, token_dim=4, num_attention_heads=1)
    with pytest.raises(ValueError, match="forward takes past_key_values.*Plain.forward does not"):
        peftx.get_peft_model(Plain(), peftx.PrefixTuningConfig(num_virtual_tokens=2, **dims))
    with pytest.raises(ValueError, match="has no get_input_embeddings"):
        peftx.get_peft_model(Plain(), peftx.PromptTuningConfig(num_virtual_tokens=2, **dims))


def test_prefix_tuning_refuses_gradient_checkpointing():
    model, _, task = make("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="disable gradient checkpointing"):
        peftx.get_peft_model(model, peftx.PrefixTuningConfig(task_type=task, num_virtual_tokens=2))


def test_multitask_task_ids_errors():
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(model, peftx.MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=2,
                                                                       num_tasks=2))
    with pytest.raises(ValueError, match="task_ids is required with multitask prompt tuning"):
        pm(**inputs)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        pm(**inputs, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        pm.generate(**inputs, task_ids=torch.tensor([-1, 0]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        pm(**inputs, task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="task_ids is required"):
        pm.generate(**inputs, max_new_tokens=2)


def test_usage_errors(tmp_path):
    model, inputs, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=2))
    with pytest.raises(ValueError, match="task_ids is only used by multitask prompt tuning"):
        pm(**inputs, task_ids=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="adapter_names .* not supported by prompt-learning"):
        pm(**inputs, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    for bad in ("a.b", "", "lora_x"):
        with pytest.raises(ValueError, match="adapter_name"):
            pm.add_adapter(bad, peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=2))
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.set_adapter("missing")
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.delete_adapter("missing")
    assert pm.unload() is pm.base_model


def test_file_errors(tmp_path):
    model, inputs, task = make("llama")
    pt = peftx.get_peft_model(twin(model), peftx.PromptEncoderConfig(task_type=task, num_virtual_tokens=2))
    pt.save_pretrained(tmp_path / "pt")
    with pytest.raises(ValueError, match="loads for inference only"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path / "pt", is_trainable=True)
    # the same file, told it has 3 virtual tokens
    import json
    cfg_path = tmp_path / "pt" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_virtual_tokens"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(2, 32\) but this model expects \(3, 32\)"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path / "pt")
    lora = peftx.get_peft_model(twin(model), peftx.LoraConfig(task_type=task, r=2))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_config.json").write_text((tmp_path / "pt" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="no 'prompt_embeddings' tensor|no place in this model"):
        peftx.PeftModel.from_pretrained(twin(model), tmp_path / "lora")


def test_prompt_tuning_and_prefix_reload_trainable(tmp_path):
    """Files whose tensors are the trained parameters themselves reload for further training."""
    model, inputs, task = make("llama")
    for config in (peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=2),
                   peftx.PrefixTuningConfig(task_type=task, num_virtual_tokens=2)):
        pm = peftx.get_peft_model(twin(model), config).eval()
        randomize_adapter(pm)
        pm.save_pretrained(tmp_path / "a")
        back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "a", is_trainable=True).eval()
        assert all(p.requires_grad for p in back.prompt_encoder.parameters())
        torch.testing.assert_close(logits(back, inputs), logits(pm, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_prefix_cache_interface_reproduces_the_peft_model(kind):
    """What methods built on prefix tuning call: the prefix tensor + prefix_forward_kwargs on the plain
    model gives the PeftModel's output."""
    model, inputs, task = make(kind)
    pm = peftx.get_peft_model(twin(model), peftx.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)).eval()
    randomize_adapter(pm.prompt_encoder)  # not bert's classifier copy: the plain model keeps its own head
    config = pm.peft_config["default"]
    encoder = pm.prompt_encoder["default"]
    assert isinstance(encoder, PrefixEncoder)
    prefix = encoder.prompts(2)
    assert prefix.shape == (2, 3, config.num_layers * 2 * config.token_dim)
    enc_dec = kind == "t5"
    kw = prefix_forward_kwargs(model, prefix, config.num_layers, config.num_attention_heads, dict(inputs),
                               encoder_decoder=enc_dec)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, logits(pm, inputs), atol=0, rtol=0)
    cache = prefix_cache(model, prefix, config.num_layers, config.num_attention_heads, enc_dec)
    assert cache.get_seq_length() == 3
    with pytest.raises(ValueError, match="prefix must be 3-D"):
        prefix_cache(model, prefix[0], config.num_layers, config.num_attention_heads)
    with pytest.raises(ValueError, match="do not pass one"):
        prefix_forward_kwargs(model, prefix, config.num_layers, config.num_attention_heads,
                              {**inputs, "past_key_values": cache}, encoder_decoder=enc_dec)


def test_prefix_on_gqa_llama_uses_key_value_heads():
    model, _, task = make("llama")  # 4 heads, 2 key/value heads of dim 8
    pm = peftx.get_peft_model(model, peftx.PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    config = pm.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 16, 2)
    hf = peft.get_peft_model(twin(model), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    assert hf.peft_config["default"].token_dim == config.token_dim
