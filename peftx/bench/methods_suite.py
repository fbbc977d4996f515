"""The methods suite: one training step (forward, backward, AdamW step on the adapter) of each PEFT
method in peftx next to HF PEFT's implementation of the same method, on the same base weights, in
the same process, timed interleaved (peftx, HF, peftx, HF, ...).

Models are built from transformers configs with random fp32 weights: a Llama (hidden 512,
intermediate 1408, 4 layers, 8 heads, vocab 4096; batch 4 x seq 128, causal-LM loss) and a BERT
of the same width for encoder-only cases (sequence classification); positions up to 2 x seq leave
room for virtual tokens. LoRA-family cases put adapters on every projection (q, k, v, o, gate, up,
down; BERT: query, key, value, dense); the others use each method's defaults (the case table).

A layer row adds LoKr on one 4096 x 4096 Linear (r=8: W1 and W2 64 x 64, full), 512 tokens,
forward + backward: peftx applies W1 and W2 to the tokens, HF PEFT materialises kron(W1, W2).

Per side: trainable parameters, median step time over the measured steps, and the step's peak
tensor memory above what is live when the step starts (allocations and frees of CPU tensors in
one profiled step, torch.profiler profile_memory, summed in time order), then peftx / HF ratios.

The case table is data: a method is one ``Case`` line (name, model kind, peftx config factory, HF
config factory or None when HF PEFT has no such method)."""

from __future__ import annotations

import copy
import logging
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftx.bench.timing import interleaved

log = logging.getLogger(__name__)

BATCH, SEQ = 4, 128
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


@dataclass(frozen=True)
class Case:
    name: str
    model: str                                   # "llama" (causal LM) or "bert" (sequence classification)
    peftx_config: Callable[[], object]
    hf_config: Callable[[], object] | None       # None: HF PEFT has no such method
    extra_inputs: Callable[[int], dict] | None = None  # batch size -> extra forward kwargs (task_ids)


def _px():
    import peftx
    return peftx


def _hf():
    import peft
    return peft


CASES = [
    Case("LoRA r=16", "llama", lambda: _px().LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                           target_modules=LLAMA_TARGETS),
         lambda: _hf().LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=LLAMA_TARGETS)),
    Case("DoRA r=16", "llama", lambda: _px().LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, use_dora=True,
                                                            target_modules=LLAMA_TARGETS),
         lambda: _hf().LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, use_dora=True,
                                  target_modules=LLAMA_TARGETS)),
    Case("LoHa r=8", "llama", lambda: _px().LoHaConfig(task_type="CAUSAL_LM", r=8, alpha=16,
                                                          target_modules=LLAMA_TARGETS),
         lambda: _hf().LoHaConfig(task_type="CAUSAL_LM", r=8, alpha=16, target_modules=LLAMA_TARGETS)),
    Case("LoKr r=8", "llama", lambda: _px().LoKrConfig(task_type="CAUSAL_LM", r=8, alpha=16,
                                                          target_modules=LLAMA_TARGETS),
         lambda: _hf().LoKrConfig(task_type="CAUSAL_LM", r=8, alpha=16, target_modules=LLAMA_TARGETS)),
    Case("LoRA r=16 (BERT)", "bert", lambda: _px().LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                                 target_modules=BERT_TARGETS),
         lambda: _hf().LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=BERT_TARGETS)),
    Case("AdaLoRA 12->4", "llama", lambda: _px().AdaLoraConfig(task_type="CAUSAL_LM", init_r=12, target_r=4,
                                                                  total_step=100, target_modules=LLAMA_TARGETS),
         lambda: _hf().AdaLoraConfig(task_type="CAUSAL_LM", init_r=12, target_r=4, total_step=100,
                                     target_modules=LLAMA_TARGETS)),
    Case("IA3", "llama", lambda: _px().IA3Config(task_type="CAUSAL_LM"), lambda: _hf().IA3Config(task_type="CAUSAL_LM")),
    Case("BitFit (BERT)", "bert", lambda: _px().BitFitConfig(task_type="SEQ_CLS"), None),
    Case("prompt tuning 16", "llama", lambda: _px().PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
         lambda: _hf().PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)),
    Case("P-tuning MLP 16", "llama",
         lambda: _px().PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, encoder_hidden_size=128),
         lambda: _hf().PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, encoder_hidden_size=128)),
    Case("prefix tuning 16", "llama", lambda: _px().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
         lambda: _hf().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)),
    Case("multitask PT 16x2", "llama",
         lambda: _px().MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, num_tasks=2,
                                                   num_ranks=1),
         lambda: _hf().MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, num_tasks=2,
                                                   num_ranks=1),
         lambda b: {"task_ids": torch.zeros(b, dtype=torch.long)}),
    Case("prompt tuning 16 (BERT)", "bert", lambda: _px().PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16),
         lambda: _hf().PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16)),
    Case("adapter houlsby rf16", "llama", lambda: _px().AdapterConfig(task_type="CAUSAL_LM", placement="houlsby",
                                                                         form="sequential", reduction_factor=16), None),
    Case("adapter pfeiffer parallel (BERT)", "bert",
         lambda: _px().AdapterConfig(task_type="SEQ_CLS", placement="pfeiffer", form="parallel", reduction_factor=16),
         None),
    Case("MAM", "llama", lambda: _px().MAMConfig(task_type="CAUSAL_LM"), None),
    Case("UniPELT", "llama", lambda: _px().UniPELTConfig(task_type="CAUSAL_LM"), None),
]


# --- models ---------------------------------------------------------------------------------------

def base_model(kind: str, tiny: bool = False):
    """The benchmark's base model with random weights (seeded); ``tiny``: scaled down, for tests."""
    import transformers as tf
    torch.manual_seed(0)
    width = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4) if tiny else \
        dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    vocab = 128 if tiny else 4096
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, max_position_embeddings=2 * SEQ, **width)
        return tf.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, max_position_embeddings=2 * SEQ, num_labels=2, **width)
        return tf.BertForSequenceClassification(cfg)
    raise ValueError(f"model kind must be 'llama' or 'bert', got {kind!r}")


def batch(kind: str, vocab: int, seq: int = SEQ) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (BATCH, seq), generator=g)
    if kind == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def train_step(model, opt, inputs) -> Callable[[], float]:
    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def step_peak_MiB(step: Callable[[], object]) -> float:
    """Peak of live CPU tensor memory during one call of ``step``, above the level when it starts."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


# --- one case -------------------------------------------------------------------------------------

def measure_case(case: Case, repeats: int, warmup: int = 1, tiny: bool = False) -> dict:
    import peftx
    base = base_model(case.model, tiny)
    inputs = batch(case.model, base.config.vocab_size, seq=16 if tiny else SEQ)
    if case.extra_inputs is not None:
        inputs.update(case.extra_inputs(BATCH))
    sides = {"peftx": peftx.get_peft_model(copy.deepcopy(base), case.peftx_config())}
    if case.hf_config is not None:
        import peft
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sides["HF PEFT"] = peft.get_peft_model(copy.deepcopy(base), case.hf_config())
    del base
    steps, out = {}, {"case": case.name, "model": case.model}
    for side, model in sides.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        out[f"{side} trainable"] = sum(p.numel() for p in params)
        steps[side] = train_step(model, torch.optim.AdamW(params, lr=1e-4), inputs)
    timings = interleaved(steps, repeats=repeats, warmup=warmup)
    for side, t in timings.items():
        out[f"{side} ms"] = t.median_ms
        out[f"{side} p10-p90 ms"] = (t.p10_ms, t.p90_ms)
        out[f"{side} peak MiB"] = statistics.median(step_peak_MiB(steps[side]) for _ in range(1 if tiny else 3))
    if "HF PEFT" in sides:
        out["x time"] = out["peftx ms"] / out["HF PEFT ms"]
        out["x peak"] = out["peftx peak MiB"] / out["HF PEFT peak MiB"]
    return out


def measure_lokr_layer(repeats: int, warmup: int = 1, tiny: bool = False) -> dict:
    """LoKr on one Linear, forward + backward (x requires grad): peftx's term without the Kronecker
    product vs HF PEFT's layer, which builds kron(W1, W2) [out, in] every forward."""
    import peft
    from peft.tuners.lokr import layer as hf_lokr
    from torch import nn

    import peftx
    n, m = (64, 16) if tiny else (4096, 512)
    torch.manual_seed(0)
    base = nn.Linear(n, n, bias=False)
    cfg = dict(r=8, alpha=16, init_weights=False)
    ours = peftx.LoKrLinear(copy.deepcopy(base), "default", 8, 16, peftx.LoKrConfig(**cfg))
    theirs = hf_lokr.Linear(copy.deepcopy(base), "default", config=peft.LoKrConfig(**cfg), r=8, alpha=16)
    with torch.no_grad():
        for name in ours.param_names:
            for k, p in getattr(ours, name).items():
                getattr(theirs, name)[k].copy_(p)
    x = torch.randn(m, n, requires_grad=True)
    g = torch.randn(m, n)

    def fwd_bwd(layer):
        def step():
            x.grad = None
            layer(x).backward(g)
        return step
    steps = {"peftx": fwd_bwd(ours), "HF PEFT": fwd_bwd(theirs)}
    out = {"case": f"LoKr layer {n}x{n}, {m} tok", "model": "layer (fwd+bwd)",
           "peftx trainable": sum(p.numel() for k, p in ours.named_parameters() if "lokr_" in k),
           "HF PEFT trainable": sum(p.numel() for k, p in theirs.named_parameters() if "lokr_" in k)}
    for side, t in interleaved(steps, repeats=repeats, warmup=warmup).items():
        out[f"{side} ms"] = t.median_ms
        out[f"{side} p10-p90 ms"] = (t.p10_ms, t.p90_ms)
        out[f"{side} peak MiB"] = step_peak_MiB(steps[side])
    out["x time"] = out["peftx ms"] / out["HF PEFT ms"]
    out["x peak"] = out["peftx peak MiB"] / out["HF PEFT peak MiB"]
    return out


def run(quick: bool, progress, tiny: bool = False, cases: list[Case] | None = None) -> list[dict]:
    repeats = 1 if tiny else (5 if quick else 15)
    extra = {"threads": torch.get_num_threads(), "repeats": repeats}
    rows = []
    for case in CASES if cases is None else cases:
        rows.append({**measure_case(case, repeats, warmup=0 if tiny else 1, tiny=tiny), **extra})
        progress()
    rows.append({**measure_lokr_layer(repeats, warmup=0 if tiny else 1, tiny=tiny), **extra})
    progress()
    return rows


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"(one training step: forward + backward + AdamW on the adapter; fp32, batch {BATCH} x seq {SEQ}; "
             f"median of {r0['repeats']} interleaved steps, {r0['threads']} threads; peak = live tensor memory "
             "above the step's start; x = peftx / HF PEFT, below 1 is better)",
             f"{'case':<27}{'trainable':>11}{'HF trainable':>13}{'peftx ms':>10}{'HF ms':>9}{'x time':>8}"
             f"{'peftx MiB':>11}{'HF MiB':>9}{'x peak':>8}"]
    for r in rows:
        hf = "HF PEFT ms" in r
        lines.append(f"{r['case']:<27}{r['peftx trainable']:>11,}"
                     f"{(format(r['HF PEFT trainable'], ',') if hf else '-'):>13}{r['peftx ms']:>10.1f}"
                     f"{(format(r['HF PEFT ms'], '.1f') if hf else '-'):>9}"
                     f"{(format(r['x time'], '.2f') + 'x' if hf else '-'):>8}{r['peftx peak MiB']:>11.1f}"
                     f"{(format(r['HF PEFT peak MiB'], '.1f') if hf else '-'):>9}"
                     f"{(format(r['x peak'], '.2f') + 'x' if hf else '-'):>8}")
    return "\n".join(lines)
