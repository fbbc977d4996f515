"""Checks specific to the prompt-learning methods (they add virtual tokens instead of wrapping
modules): generation with left padding, token-for-token generation against HF PEFT for the same
saved adapter in both directions, and forward equality with HF PEFT. The method-agnostic checks
(training, exact save/load, parameter counts) come from method_checks.py."""

from __future__ import annotations

import torch

import peftx
from tests.integration.tiny_models import twin
from tests.tuners.method_checks import randomize_adapter

GREEDY = dict(max_new_tokens=6, do_sample=False)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def check_forward_matches_hf(model, inputs, ours_config, hf_config, tmp_path, atol=1e-5, rtol=1e-5):
    """The same saved adapter gives the same logits in peftx and HF PEFT, whichever library saved it."""
    import peft
    ours = peftx.get_peft_model(twin(model), ours_config)
    randomize_adapter(ours, seed=1)
    ours.eval().save_pretrained(tmp_path / "ours")
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(hf, inputs), _logits(ours, inputs), atol=atol, rtol=rtol)

    theirs = peft.get_peft_model(twin(model), hf_config)
    randomize_adapter(theirs, seed=2)
    theirs.eval().save_pretrained(tmp_path / "hf")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(back, inputs), _logits(theirs, inputs), atol=atol, rtol=rtol)
    return ours, back


def check_generate_matches_hf(model, input_ids, ours_config, hf_config, tmp_path, **gen_kwargs):
    """Greedy tokens: a peftx-saved adapter loaded into HF PEFT generates what peftx generates, and an
    HF-saved adapter loaded into peftx generates what HF PEFT generates."""
    import peft
    ours = peftx.get_peft_model(twin(model), ours_config)
    randomize_adapter(ours, seed=3)
    ours.eval().save_pretrained(tmp_path / "gen-ours")
    hf = peft.PeftModel.from_pretrained(twin(model), tmp_path / "gen-ours").eval()
    mine = ours.generate(input_ids=input_ids, **gen_kwargs, **GREEDY)
    assert torch.equal(hf.generate(input_ids=input_ids, **gen_kwargs, **GREEDY), mine)

    theirs = peft.get_peft_model(twin(model), hf_config)
    randomize_adapter(theirs, seed=4)
    theirs.eval().save_pretrained(tmp_path / "gen-hf")
    back = peftx.PeftModel.from_pretrained(twin(model), tmp_path / "gen-hf").eval()
    ref = theirs.generate(input_ids=input_ids, **gen_kwargs, **GREEDY)
    assert torch.equal(back.generate(input_ids=input_ids, **gen_kwargs, **GREEDY), ref)
    # the adapter matters: the base model alone generates something else
    with back.disable_adapter():
        assert not torch.equal(back.generate(input_ids=input_ids, **GREEDY), ref)
    return mine


def check_left_padded_generate(pm, input_ids, pad_id=0, task_ids=None):
    """A left-padded batch generates, row by row, the tokens each row generates alone without padding."""
    n, length = input_ids.shape
    pads = [(i * 2) % (length - 2) for i in range(n)]  # row 0 unpadded, the others with some padding
    padded = input_ids.clone()
    mask = torch.ones_like(input_ids)
    for i, p in enumerate(pads):
        padded[i, :p] = pad_id
        mask[i, :p] = 0
    assert any(pads), "the batch must have padding"
    kw = {} if task_ids is None else {"task_ids": task_ids}
    scores = dict(output_logits=True, return_dict_in_generate=True)
    batch = pm.generate(input_ids=padded, attention_mask=mask, pad_token_id=pad_id, **kw, **GREEDY, **scores)
    for i, p in enumerate(pads):
        row_kw = {} if task_ids is None else {"task_ids": task_ids[i:i + 1]}
        alone = pm.generate(input_ids=input_ids[i:i + 1, p:], pad_token_id=pad_id, **row_kw, **GREEDY, **scores)
        seq, ref = batch.sequences[i, length:], alone.sequences[0, length - p:]
        assert torch.equal(seq, ref), (i, seq, ref)
        # every step's logits, not only the argmax (positions off by the padding would show here)
        for step, (got, want) in enumerate(zip(batch.logits, alone.logits)):
            torch.testing.assert_close(got[i], want[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"row {i} step {step}: {m}")
