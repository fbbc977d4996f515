"""Tiny transformers models built from configs (random init, no downloads), each with inputs."""

import copy

import torch


def make(kind: str, seed: int = 0):
    """(model, inputs dict, task_type) for kind in llama, mistral, qwen2, gpt2, bert, roberta, t5, mt5."""
    import transformers as tf
    torch.manual_seed(seed)
    ids = torch.randint(3, 100, (2, 9))
    if kind in ("llama", "mistral", "qwen2"):
        cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[kind]
        model_cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[kind]
        cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return model_cls(cfg).eval(), {"input_ids": ids}, "CAUSAL_LM"
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids}, "CAUSAL_LM"
    if kind in ("bert", "roberta"):
        cfg_cls = tf.BertConfig if kind == "bert" else tf.RobertaConfig
        model_cls = tf.BertForSequenceClassification if kind == "bert" else tf.RobertaForSequenceClassification
        cfg = cfg_cls(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3)
        return model_cls(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "SEQ_CLS"
    if kind == "mt5":
        cfg = tf.MT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           decoder_start_token_id=0)
        return tf.MT5ForConditionalGeneration(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}, \
            "SEQ_2_SEQ_LM"
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}, \
            "SEQ_2_SEQ_LM"
    raise ValueError(kind)


def twin(model):
    return copy.deepcopy(model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits
