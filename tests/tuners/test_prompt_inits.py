"""Prompt tuning's TEXT init (with a tokenizer built locally, no hub) and multitask prompt tuning's
inits from a source adapter, each against HF PEFT's init from the same inputs."""

import peft
import pytest
import torch

import peftx
from tests.integration.tiny_models import make, twin


@pytest.fixture(autouse=True)
def _quiet(recwarn):
    pass


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer whose ids fall inside the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("text,expected", [
    ("w5 w9 w12 w7 w30 w31 w32", [7, 11, 14, 9, 32]),     # w<i> is id i + 2; longer than 5 virtual tokens: truncated
    ("w5 w9", [7, 11, 7, 11, 7]),                          # shorter: repeated, then truncated
])
def test_text_init_uses_the_text_tokens_like_hf(tokenizer_dir, text, expected):
    model, _, task = make("llama")
    kw = dict(task_type=task, num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
              tokenizer_name_or_path=tokenizer_dir)
    ours = peftx.get_peft_model(twin(model), peftx.PromptTuningConfig(**kw))
    table = ours.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table, model.get_input_embeddings().weight[expected], atol=0, rtol=0)
    theirs = peft.get_peft_model(twin(model), peft.PromptTuningConfig(**kw))
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


def test_text_init_errors(tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        peftx.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="w1")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        peftx.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", tokenizer_name_or_path=tokenizer_dir)
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        peftx.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match="only used with prompt_tuning_init='TEXT'"):
        peftx.PromptTuningConfig(num_virtual_tokens=3, tokenizer_kwargs={"use_fast": True})
    model, _, task = make("llama")
    bad = peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="w1", tokenizer_name_or_path=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="tokenizer_name_or_path: could not load a tokenizer"):
        peftx.get_peft_model(twin(model), bad)


def test_sample_vocab_init_takes_rows_of_the_vocabulary():
    model, _, task = make("llama")
    pm = peftx.get_peft_model(twin(model), peftx.PromptTuningConfig(task_type=task, num_virtual_tokens=4,
                                                                    prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = model.get_input_embeddings().weight
    for row in pm.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(dim=1).any()


@pytest.fixture
def source_adapter(tmp_path):
    model, inputs, task = make("llama")
    src = peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=3,
                                                                              num_tasks=3, num_ranks=2))
    with torch.no_grad():
        for p in src.prompt_encoder.parameters():
            p.add_(torch.randn_like(p))
    src.save_pretrained(tmp_path / "src")
    return model, task, str(tmp_path / "src" / "adapter_model.safetensors"), src.prompt_encoder["default"]


@pytest.mark.parametrize("init", ["EXACT_SOURCE_TASK", "AVERAGE_SOURCE_TASKS", "ONLY_SOURCE_SHARED"])
def test_multitask_source_inits_match_hf(source_adapter, init):
    model, task, path, src = source_adapter
    kw = dict(task_type=task, num_virtual_tokens=3, num_tasks=1, num_ranks=2, prompt_tuning_init=init,
              prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=1)
    torch.manual_seed(0)
    ours = peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(**kw)).prompt_encoder["default"]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(twin(model), peft.MultitaskPromptTuningConfig(**kw)).prompt_encoder["default"]
    torch.testing.assert_close(ours.embedding.weight, src.embedding.weight, atol=0, rtol=0)
    if init == "EXACT_SOURCE_TASK":
        torch.testing.assert_close(ours.prefix_task_cols[0], src.prefix_task_cols[1], atol=0, rtol=0)
    elif init == "AVERAGE_SOURCE_TASKS":
        torch.testing.assert_close(ours.prefix_task_rows[0], src.prefix_task_rows.mean(0), atol=0, rtol=0)
    else:
        assert not torch.equal(ours.prefix_task_cols[0], src.prefix_task_cols[0])
    for name in ("embedding.weight", "prefix_task_cols", "prefix_task_rows"):
        if init == "ONLY_SOURCE_SHARED" and name != "embedding.weight":
            continue  # random (same seed, same draws as HF is not promised)
        torch.testing.assert_close(ours.get_parameter(name), theirs.get_parameter(name), atol=0, rtol=0)


def test_multitask_source_init_errors(source_adapter, tmp_path):
    model, task, path, _ = source_adapter
    with pytest.raises(ValueError, match="needs prompt_tuning_init_state_dict_path"):
        peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(
            task_type=task, num_virtual_tokens=3, prompt_tuning_init="EXACT_SOURCE_TASK"))
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(
            task_type=task, num_virtual_tokens=3, prompt_tuning_init="EXACT_SOURCE_TASK",
            prompt_tuning_init_state_dict_path="source.bin"))
    kw = dict(task_type=task, num_virtual_tokens=3, num_ranks=2, prompt_tuning_init="EXACT_SOURCE_TASK",
              prompt_tuning_init_state_dict_path=path)
    with pytest.raises(ValueError, match=r"prompt_tuning_init_task must be in \[0, 3\)"):
        peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(**kw, prompt_tuning_init_task=3))
    with pytest.raises(ValueError, match="num_ranks, token_dim must match"):
        peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(**{**kw, "num_ranks": 1}))
    # several target tasks all start from the chosen source task
    pm = peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(**kw, num_tasks=2))
    cols = pm.prompt_encoder["default"].prefix_task_cols
    torch.testing.assert_close(cols[0], cols[1], atol=0, rtol=0)


def test_multitask_adapter_from_a_source_loads_without_the_source(source_adapter, tmp_path):
    """The saved config names the source file; loading the adapter for inference does not read it."""
    import os
    model, task, path, _ = source_adapter
    kw = dict(task_type=task, num_virtual_tokens=3, num_ranks=2, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
              prompt_tuning_init_state_dict_path=path)
    pm = peftx.get_peft_model(twin(model), peftx.MultitaskPromptTuningConfig(**kw)).eval()
    pm.save_pretrained(tmp_path / "target")
    os.remove(path)
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "target")
    ids = {"input_ids": torch.randint(3, 100, (1, 5)), "task_ids": torch.tensor([0])}
    with torch.no_grad():
        torch.testing.assert_close(back(**ids).logits, pm(**ids).logits, atol=0, rtol=0)
