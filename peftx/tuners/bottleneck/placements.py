"""Where bottleneck adapters go, per architecture.

An adapter *site* is a sublayer's output projection (the module peftx wraps) and the sublayer module
whose input parallel adapters read. Both are named relative to the transformer block, so they pair up
layer by layer. Exactly where the adapter acts, per architecture (transformers' module names):

=========  ==============================  ====================================  =======================
model      attention site (houlsby)        feed-forward site (houlsby, pfeiffer)  residual add after
=========  ==============================  ====================================  =======================
llama      self_attn.o_proj  <- self_attn  mlp.down_proj      <- mlp             decoder layer (pre-LN)
gpt2       attn.c_proj       <- attn       mlp.c_proj         <- mlp             block, after
                                                                                 resid_dropout (pre-LN)
bert       attention.output.dense          output.dense       <- intermediate    BertSelfOutput /
           <- attention.self                                                     BertOutput: dropout,
                                                                                 then LayerNorm(h + x)
t5         SelfAttention.o <- SelfAttention, DenseReluDense.wo                   T5Layer*: x + dropout(h)
           EncDecAttention.o (decoder)     <- DenseReluDense
           <- EncDecAttention
=========  ==============================  ====================================  =======================

(mistral, qwen2 as llama; roberta as bert; mt5 as t5.)

- sequential: the wrapped projection's output ``h`` becomes ``h + f(h)``. That is after the sublayer's
  last linear map and before its dropout and residual add -- for BERT before the LayerNorm, which
  sits inside BertSelfOutput/BertOutput together with the residual add (as in Houlsby et al.).
- parallel: ``h + f(x)`` where ``x`` is the input of the sublayer module after the arrow (its first
  positional argument or ``hidden_states=``), i.e. the normalized hidden state in pre-LN models
  (Llama, GPT-2, T5) and the previous sublayer's LayerNorm output in BERT (He et al. 2021).

Several adapters active at once: sequential ones apply in turn (h <- h + f_n(h)), parallel ones each
add f_n(x)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from peftx.tuners.targets import _is_adapter_internal, _layer_ok, _under, is_linear_like, model_type_of

_LLAMA = {"attn": {"self_attn.o_proj": "self_attn"}, "ffn": {"mlp.down_proj": "mlp"}}
_BERT = {"attn": {"attention.output.dense": "attention.self"}, "ffn": {"output.dense": "intermediate"}}
_T5 = {"attn": {"SelfAttention.o": "SelfAttention", "EncDecAttention.o": "EncDecAttention"},
       "ffn": {"DenseReluDense.wo": "DenseReluDense"}}

PLACEMENT_TABLE: dict[str, dict[str, dict[str, str]]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gpt2": {"attn": {"attn.c_proj": "attn"}, "ffn": {"mlp.c_proj": "mlp"}},
    "bert": _BERT, "roberta": _BERT,
    "t5": _T5, "mt5": _T5,
}

KINDS_OF = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}


@dataclass(frozen=True)
class Site:
    name: str        # the output projection that is wrapped
    kind: str        # "attn" or "ffn"
    input_name: str  # the sublayer module whose input parallel adapters read


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _rules(model: nn.Module, config) -> dict[str, dict[str, str | None]]:
    model_type = model_type_of(model)
    table = PLACEMENT_TABLE.get(model_type, {})
    given = {"attn": config.attn_modules, "ffn": config.ffn_modules}
    rules = {k: given[k] if given[k] is not None else table.get(k) for k in ("attn", "ffn")}
    if rules["ffn"] is None:
        raise ValueError(f"bottleneck adapters: peftx has no placement table for model_type {model_type!r} "
                         f"(known: {sorted(PLACEMENT_TABLE)}); pass ffn_modules (and attn_modules for placement "
                         "'houlsby') naming the sublayer output projections, e.g. ffn_modules=['mlp.down_proj'], "
                         "attn_modules=['self_attn.o_proj']")
    if config.placement == "houlsby" and rules["attn"] is None:
        raise ValueError(f"placement 'houlsby' puts an adapter after each attention sublayer, but no attention "
                         f"output module is known for model_type {model_type!r}; pass attn_modules "
                         "(e.g. ['self_attn.o_proj']) or use placement='pfeiffer' (feed-forward only)")
    return rules


def plan_sites(model: nn.Module, config, skip=frozenset()) -> list[Site]:
    """The sites ``config`` (an AdapterConfig or a config with the same placement fields) adapts.
    When several rules match a module, the longest suffix wins (BERT's 'output.dense' vs
    'attention.output.dense'); a module whose best rule belongs to a kind the placement leaves out is
    not adapted."""
    rules = _rules(model, config)
    kinds = KINDS_OF[config.placement]
    flat = [(suffix, inp, kind) for kind in ("attn", "ffn") if rules[kind] for suffix, inp in rules[kind].items()]
    modules = dict(model.named_modules())
    sites, hits = [], {k: 0 for k in kinds}
    for name, module in modules.items():
        if not name or _under(name, skip) or _is_adapter_internal(name):
            continue
        matching = [r for r in flat if _ends_with(name, r[0])]
        if not matching:
            continue
        suffix, inp, kind = max(matching, key=lambda r: len(r[0]))
        if kind not in kinds:
            continue
        hits[kind] += 1
        if not _layer_ok(config, name):
            continue
        if not is_linear_like(getattr(module, "base_layer", module)):
            raise ValueError(f"{kind}_modules: {name!r} is a {type(module).__name__}; bottleneck adapters wrap a "
                             "sublayer's output projection (torch.nn.Linear, transformers Conv1D or "
                             "peftx.Linear4bit): name that module instead")
        block = name[:-len(suffix)].rstrip(".")
        input_name = name.rpartition(".")[0] if inp is None else (f"{block}.{inp}" if block else inp)
        if config.form == "parallel" and input_name not in modules:
            raise ValueError(f"form 'parallel': the sublayer input module {input_name!r} for {name!r} does not exist; "
                             f"pass {kind}_modules as a dict {{output module suffix: sublayer module suffix}}")
        sites.append(Site(name, kind, input_name))
    for kind in kinds:
        if not hits[kind]:
            leaves = sorted({n.split(".")[-1] for n in modules if n and not _is_adapter_internal(n)})
            close = sorted({c for s in rules[kind] for c in difflib.get_close_matches(s.split(".")[-1], leaves, n=5,
                                                                                         cutoff=0.5)})
            what = "after attention" if kind == "attn" else "after the feed-forward"
            hint = " or placement='pfeiffer' (feed-forward only)" if kind == "attn" else ""
            raise ValueError(f"placement {config.placement!r} puts adapters {what}, but {kind}_modules "
                             f"{list(rules[kind])} matched no module of {type(model).__name__}"
                             + (f" (close names: {close})" if close else "")
                             + f"; pass {kind}_modules naming its output projections{hint}")
    if not sites:
        raise ValueError(f"layers_to_transform {config.layers_to_transform} left no module to adapt")
    return sites
