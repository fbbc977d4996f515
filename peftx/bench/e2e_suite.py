"""The e2e suite: one training step (forward, backward, AdamW step) of a Llama built from a config
(hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000; random weights in bf16), batch 4 x
seq 256, LoRA r=16, alpha 32, dropout 0.05 on all seven projections, no gradient checkpointing, torch
AdamW on the adapter on both sides (nothing else trains; the norms, embeddings and lm_head stay bf16:
prepare_model_for_kbit_training is not applied on either side).

Variants, each in its own subprocess so memory peaks do not mix:
- peftx QLoRA (peftx.quantize_model: NF4 blocksize 64, double quantization, bf16 compute) vs HF PEFT
  over bitsandbytes' Linear4bit (the same NF4 settings, quantized on the CPU);
- peftx LoRA vs HF PEFT LoRA on the bf16 base.

Reported: median step time over the measured steps, tokens/s (batch x seq / step), the peak RSS while
training (the VmHWM high-water mark, reset after the model is built, so it covers training only), the
RSS when training starts (mostly the model), and for peftx variants the fraction of one profiled step
spent inside peftx ops (outermost ``peftx::*`` events of torch.profiler; the profiler's overhead
inflates the step a little). bitsandbytes 0.50's CPU dequantize of double-quantized state decodes
wrongly, which does not change its speed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

BATCH, SEQ = 4, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT = 16, 32, 0.05
# (variant, anchor): ratios are taken against the anchor measured in the same run.
VARIANTS = {"peftx QLoRA": "HF PEFT + bnb 4bit", "HF PEFT + bnb 4bit": "HF PEFT + bnb 4bit",
            "peftx LoRA bf16": "HF PEFT LoRA bf16", "HF PEFT LoRA bf16": "HF PEFT LoRA bf16"}
KEYS = {"peftx QLoRA": "peftx-qlora", "HF PEFT + bnb 4bit": "hf-bnb", "peftx LoRA bf16": "peftx-lora",
        "HF PEFT LoRA bf16": "hf-lora"}


# --- the child process: one variant -----------------------------------------------------------------

def llama_config(tiny: bool = False):
    """The benchmark's Llama; ``tiny``: the same architecture scaled down, for tests of this suite."""
    import transformers
    if tiny:
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=1024,
                                        max_position_embeddings=SEQ)
    return transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                    num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                    max_position_embeddings=SEQ)


def _bnb_quantize(model):
    import bitsandbytes as bnb
    from torch import nn
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            q = q.to("cpu")  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


def build(key: str, tiny: bool = False):
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(llama_config(tiny), dtype=torch.bfloat16)
    if key in ("peftx-qlora", "peftx-lora"):
        import peftx
        if key == "peftx-qlora":
            model = peftx.quantize_model(model, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
        config = peftx.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                  target_modules=TARGETS)
        return peftx.get_peft_model(model, config)
    import peft
    if key == "hf-bnb":
        model = _bnb_quantize(model)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                             target_modules=TARGETS)
    return peft.get_peft_model(model, config)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_and_reset_peak() -> None:
    """Returns freed heap to the OS and restarts the RSS high-water mark from the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peftx_op_seconds(prof) -> float:
    """Seconds inside outermost peftx ops (a peftx op called from another counts once)."""
    total = 0.0
    for e in prof.events():
        if not e.name.startswith("peftx::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("peftx::"):
            parent = parent.cpu_parent
        if parent is None:
            total += e.time_range.elapsed_us() / 1e6
    return total


def measure(key: str, steps: int, warmup: int, profile: bool, tiny: bool = False) -> dict:
    t0 = time.perf_counter()
    model = build(key, tiny).train()
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    _release_and_reset_peak()
    start_kib = _status_kib("VmRSS")
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak_kib = _status_kib("VmHWM")
    out = {"variant": key, "build_s": build_s, "step_s": times, "median_s": statistics.median(times),
           "tokens_per_s": BATCH * SEQ / statistics.median(times), "peak_MiB": peak_kib / 1024,
           "start_MiB": start_kib / 1024, "trainable": sum(p.numel() for p in params),
           "threads": torch.get_num_threads()}
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            step()
            wall = time.perf_counter() - t
        out["peftx_op_s"] = peftx_op_seconds(prof)
        out["profiled_step_s"] = wall
        out["peftx_fraction"] = out["peftx_op_s"] / wall
    return out


def _child_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftx.bench.e2e_suite", description="one e2e variant (internal)")
    p.add_argument("--variant", choices=sorted(KEYS.values()), required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a scaled-down Llama (tests)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)  # bitsandbytes' notes about optional kernels; the JSON line is the output
    print(json.dumps(measure(args.variant, args.steps, args.warmup, args.profile, args.tiny)), flush=True)
    return 0


# --- the parent: python -m peftx.bench e2e -------------------------------------------------------------

def _run_child(key: str, steps: int, warmup: int, tiny: bool = False) -> dict:
    cmd = [sys.executable, "-m", "peftx.bench.e2e_suite", "--variant", key, "--steps", str(steps),
           "--warmup", str(warmup), "--threads", str(torch.get_num_threads())] + (["--tiny"] if tiny else [])
    if key.startswith("peftx"):
        cmd.append("--profile")
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if res.returncode != 0:
        raise RuntimeError(f"e2e variant {key!r} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(quick: bool, progress, tiny: bool = False) -> list[dict]:
    steps, warmup = (3, 1) if quick else (10, 2)
    measured = {}
    for name, key in KEYS.items():
        measured[name] = _run_child(key, steps, warmup, tiny)
        progress()
    return rows_from(measured)


def rows_from(measured: dict[str, dict]) -> list[dict]:
    """One row per variant with its ratios to its anchor."""
    rows = []
    for name, anchor in VARIANTS.items():
        r, a = measured[name], measured[anchor]
        rows.append({**r, "variant": name, "anchor": anchor,
                     "x_tokens_per_s": r["tokens_per_s"] / a["tokens_per_s"],
                     "x_peak": r["peak_MiB"] / a["peak_MiB"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"(batch {BATCH} x seq {SEQ}; {len(rows[0]['step_s'])} measured steps per variant after warm-up, "
             f"{rows[0]['threads']} threads; x anchor: against HF PEFT on the same base)",
             f"{'variant':<21}{'step s':>8}{'tokens/s':>10}{'x anchor':>10}{'peak MiB':>10}{'x anchor':>10}"
             f"{'start MiB':>11}{'in peftx ops':>14}"]
    for r in rows:
        frac = f"{r['peftx_fraction']:.0%}" if "peftx_fraction" in r else "-"
        lines.append(f"{r['variant']:<21}{r['median_s']:>8.2f}{r['tokens_per_s']:>10.0f}{r['x_tokens_per_s']:>9.2f}x"
                     f"{r['peak_MiB']:>10.0f}{r['x_peak']:>9.2f}x{r['start_MiB']:>11.0f}{frac:>14}")
    q = next(r for r in rows if r["variant"] == "peftx QLoRA")
    bf16 = next(r for r in rows if r["variant"] == "HF PEFT LoRA bf16")
    lines.append(f"target: peftx QLoRA >= 1.2x HF PEFT + bnb tokens/s (now {q['x_tokens_per_s']:.2f}x, "
                 f"{q['x_tokens_per_s'] / 1.2:.0%} of target), faster than HF PEFT bf16 (now "
                 f"{q['tokens_per_s'] / bf16['tokens_per_s']:.2f}x), peak <= 0.8x HF PEFT + bnb (now "
                 f"{q['x_peak']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_child_main())
