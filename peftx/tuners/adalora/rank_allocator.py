"""AdaLoRA's RankAllocator (Zhang et al., 2023), with HF PEFT's arithmetic so both pick the same masks.

Importance of every adapter weight w: the sensitivity I = |w * dL/dw|, smoothed
``Ibar <- beta1 Ibar + (1 - beta1) I`` and its uncertainty ``U <- beta2 U + (1 - beta2) |I - Ibar|``;
the score of an entry is ``Ibar * U``. A singular triplet i of a module scores
``S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``.

Budget (total kept singular values): ``init_r * n`` until ``tinit``, then
``int((b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT)`` with ``bT = target_r * n``; at
steps divisible by ``deltaT`` the ``b0 - budget`` lowest triplets (ties included) get E_i = 0. At step
``T - tfinal`` the final mask is computed once and then re-applied every step (the optimizer would
revive masked values)."""

from __future__ import annotations

import torch


class RankAllocator:
    def __init__(self, layers: dict, config, adapter_name: str):
        """``layers``: {module name: AdaLoraLinear} holding ``adapter_name``, in model order."""
        self.config = config
        self.adapter_name = adapter_name
        self.layers = dict(layers)
        self.init_bgt = sum(m.adapters[adapter_name].r for m in self.layers.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, list[torch.Tensor]] = {}
        self.exp_avg_unc: dict[str, list[torch.Tensor]] = {}

    def _params(self, m) -> list[torch.Tensor]:
        n = self.adapter_name
        return [m.lora_A[n], m.lora_B[n], m.lora_E[n]]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        names = list(self.layers)
        params = [p for k in names for p in self._params(self.layers[k])]
        missing = [k for k in names if any(p.grad is None and p.numel() for p in self._params(self.layers[k]))]
        if missing:
            raise RuntimeError(f"update_and_allocate: no gradient for the AdaLoRA factors of {missing[:3]}; call it "
                               "after loss.backward() and before optimizer.zero_grad()")
        ipt = torch._foreach_abs(torch._foreach_mul(params, [torch.zeros_like(p) if p.grad is None else p.grad
                                                           for p in params]))
        if not self.exp_avg_ipt:
            ema = [torch.zeros_like(p) for p in params]
            unc = [torch.zeros_like(p) for p in params]
        else:
            ema = [t for k in names for t in self.exp_avg_ipt[k]]
            unc = [t for k in names for t in self.exp_avg_unc[k]]
        b1, b2 = self.config.beta1, self.config.beta2
        ema = torch._foreach_add(torch._foreach_mul(ema, b1), torch._foreach_mul(ipt, 1 - b1))
        dev = torch._foreach_abs(torch._foreach_sub(ipt, ema))
        unc = torch._foreach_add(torch._foreach_mul(unc, b2), torch._foreach_mul(dev, 1 - b2))
        for i, k in enumerate(names):
            self.exp_avg_ipt[k] = ema[3 * i:3 * i + 3]
            self.exp_avg_unc[k] = unc[3 * i:3 * i + 3]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: [r] scores of its singular triplets}."""
        out = {}
        for k in self.layers:
            sA, sB, sE = (e * u for e, u in zip(self.exp_avg_ipt[k], self.exp_avg_unc[k]))
            out[k] = sE.view(-1) + (sA.mean(dim=1) + sB.mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        all_scores = torch.cat([s for s in scores.values()])
        threshold = torch.kthvalue(all_scores, k=k)[0].item() if k > 0 else float("-inf")
        pattern = {}
        for name, s in scores.items():
            drop = s <= threshold
            self.layers[name].lora_E[self.adapter_name].masked_fill_(drop.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict) -> None:
        for name, m in self.layers.items():
            key = f"{name}.lora_E"
            keep = rank_pattern.get(key, rank_pattern.get(f"{key}.{self.adapter_name}"))
            if keep is None:
                continue
            E = m.lora_E[self.adapter_name]
            E.masked_fill_(~torch.as_tensor(keep, dtype=torch.bool, device=E.device).view(-1, 1), 0.0)

    def update_and_allocate(self, step: int, force_mask: bool = False):
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt()
        budget, mask_now = self.budget_schedule(step)
        return budget, (self.mask_to_budget(budget) if mask_now or force_mask else None)
