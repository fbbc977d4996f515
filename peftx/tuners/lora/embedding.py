"""LoRA over ``nn.Embedding``: a gather of A's columns followed by the small product with B
(``lora_embedding_A`` [r, num_embeddings] zero and ``lora_embedding_B`` [dim, r] normal at init, as
HF PEFT, so the output equals the base at init)."""

from __future__ import annotations

import torch
from torch import nn

from peftx.tuners.lora.adapters import AdapterSpec, check_new_name, check_spec


class LoraEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"base must be a torch.nn.Embedding, got {type(base).__name__}")
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    @property
    def weight(self):
        """The base embedding's weight (transformers reads it, e.g. to tie the output layer)."""
        return self.base_layer.weight

    def add_adapter(self, adapter_name, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True):
        check_new_name(self, adapter_name)
        spec = check_spec(r, lora_alpha, lora_dropout, use_rslora)
        w = self.base_layer.weight
        A = torch.zeros(r, w.shape[0], device=w.device, dtype=torch.float32)
        B = torch.empty(w.shape[1], r, device=w.device, dtype=torch.float32)
        if init_lora_weights is False:
            nn.init.normal_(A)
        nn.init.normal_(B)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)
        self.adapters[adapter_name] = spec
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def set_adapter(self, adapter_names):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; this layer has {sorted(self.adapters)}")
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this layer has {sorted(self.adapters)}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before deleting it")
        del self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name], self.adapters[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * (B A)^T`` [num_embeddings, dim] in fp32."""
        return (self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]).t() * \
            self.adapters[adapter_name].scaling

    def merge(self, adapter_names=None):
        for n in list(self.active_adapters if adapter_names is None else adapter_names):
            if n not in self.merged_adapters:
                w = self.base_layer.weight
                w.data.copy_((w.data.float() + self.get_delta_weight(n)).to(w.dtype))
                self.merged_adapters.append(n)

    def unmerge(self):
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            w = self.base_layer.weight
            w.data.copy_((w.data.float() - self.get_delta_weight(n)).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disable_adapters:
            return y
        b = self.base_layer
        for n in self.active_adapters:
            if n in self.merged_adapters:
                continue
            A = self.lora_embedding_A[n]
            # The gather: rows of A^T for the token ids, with the base embedding's index semantics.
            after_A = nn.functional.embedding(x, A.t(), b.padding_idx, b.max_norm, b.norm_type,
                                              b.scale_grad_by_freq, b.sparse)
            y = y + ((after_A @ self.lora_embedding_B[n].t()) * self.adapters[n].scaling).to(y.dtype)
        return y
