"""LoRA / QLoRA training under torch.distributed DistributedDataParallel (gloo, CPU), launched with torchrun:

    torchrun --standalone --nproc_per_node 2 examples/ddp_lora.py --method lora qlora --out /tmp/adapters

Every process builds the same small Llama from a config (seeded: no download), quantizes it to NF4
for QLoRA, adds the same LoRA adapter, checks with ``peftx.distributed.check_consistent`` that all
processes agree on the adapter setup, wraps the model in DDP and trains on its share of each global
batch (DDP averages the gradients, so N processes take the same steps as one process on the whole
batch). Rank 0 saves each adapter (HF PEFT format) to ``--out``/<method>.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

import peftx
from peftx.distributed import check_consistent

log = logging.getLogger("ddp_lora")


def build_model(method: str, r: int, seed: int, dropout: float) -> peftx.PeftModel:
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = tf.LlamaForCausalLM(cfg)
    if method == "qlora":
        model = peftx.quantize_model(model, compute_dtype=torch.float32)
    torch.manual_seed(seed + 1)
    config = peftx.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=dropout,
                              target_modules="all-linear")
    return peftx.get_peft_model(model, config)


def global_batches(steps: int, global_batch: int, seq: int, seed: int) -> torch.Tensor:
    """[steps, global_batch, seq] token ids: the same on every process."""
    return torch.randint(3, 256, (steps, global_batch, seq), generator=torch.Generator().manual_seed(seed))


def train(method: str, args, rank: int, world: int) -> None:
    model = build_model(method, args.r, args.seed, args.dropout).train()
    digest = check_consistent(model)
    log.info("%s: %d processes agree on the adapter setup (fingerprint %s)", method, world, digest[:12])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = [q for q in ddp.parameters() if q.requires_grad]
    opt = (torch.optim.AdamW(params, lr=args.lr) if args.optimizer == "adamw"
           else torch.optim.SGD(params, lr=args.lr, momentum=0.9))
    local = args.global_batch // world
    for step, batch in enumerate(global_batches(args.steps, args.global_batch, args.seq, args.seed + 2)):
        ids = batch[rank * local:(rank + 1) * local]
        loss = ddp(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the adapter gradients over the processes here
        opt.step()
        log.info("%s step %d: local loss %.4f", method, step, loss.item())
    if rank == 0 and args.out:
        model.save_pretrained(os.path.join(args.out, method))
        log.info("%s adapter saved to %s", method, os.path.join(args.out, method))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", choices=["lora", "qlora"], default=["lora"],
                   help="one or more methods, trained in turn")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=4, help="sequences per step over all processes")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the trained adapters (written by rank 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[rank %(rank)s] %(message)s")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.getLogger().handlers[0].addFilter(lambda rec: setattr(rec, "rank", rank) or True)
    try:
        if args.global_batch % world:
            raise ValueError(f"--global-batch {args.global_batch} must be divisible by the number of processes {world}")
        for method in args.method:
            train(method, args, rank, world)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
