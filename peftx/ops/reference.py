"""Pure-torch twins (``*_ref``) of the peftx ops: the definition each kernel is tested against and the
fallback where no kernel applies. They follow bitsandbytes 0.50's definitions of the NF4 format."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftx._native import _C

NF4_CODE = torch.tensor(_C.nf4_code(), dtype=torch.float32)
NF4_MIDPOINTS = torch.tensor(_C.nf4_midpoints(), dtype=torch.float32)
DYNAMIC_CODE = torch.tensor(_C.dynamic_code(), dtype=torch.float32)


def nf4_quantize_ref(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 over the flattened tensor -> (packed uint8 [ceil(n/2), 1], absmax fp32)."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, NF4_MIDPOINTS.to(scaled.device)).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, absmax


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    out = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return out[:n].long()


def nf4_dequantize_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                       shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    values = code[unpack_nibbles(packed, n)]
    scales = absmax.repeat_interleave(blocksize)[:n]
    return (values * scales).to(dtype).reshape(shape)


def nf4_double_quantize_ref(absmax: torch.Tensor, code: torch.Tensor,
                            blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit blockwise codes of (absmax - mean), as bitsandbytes 0.50's CPU quantizer computes them:
    t = x / blockmax snapped to a 16-bit grid, then the code whose midpoint interval holds it."""
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, blocksize)
    nested = blocks.abs().amax(dim=-1)
    inv = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))
    t = torch.clamp(blocks * inv.view(-1, 1), -1, 1)
    u = (t + 1.0) * 0.5
    # fma(u, 65535, 0.5) in fp32: the float64 product and sum are exact, so one rounding to fp32.
    c = (u.double() * 65535.0 + 0.5).float().trunc()
    v = (c + c) / 65535.0 - 1.0
    mids = (code[:-1] + code[1:]) * 0.5
    q = torch.searchsorted(mids, v.reshape(-1).contiguous(), side="left").reshape(blocks.shape)
    q = torch.where(nested.view(-1, 1) > 0, q, torch.zeros_like(q))
    return q.reshape(-1)[:n].to(torch.uint8), nested, offset


def nf4_double_dequantize_ref(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor,
                              offset: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = qabsmax.numel()
    return code[qabsmax.long()] * nested_absmax.repeat_interleave(blocksize)[:n] + offset.reshape(())


def nf4_matmul_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias), computed in fp32 and returned in x's dtype."""
    w = nf4_dequantize_ref(packed, absmax, code, blocksize, (out_features, x.shape[-1]), torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def nf4_matmul_t_ref(grad: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, in_features: int) -> torch.Tensor:
    w = nf4_dequantize_ref(packed, absmax, code, blocksize, (grad.shape[-1], in_features), torch.float32)
    return (grad.float() @ w).to(grad.dtype)


# --- LoRA ---------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def philox4x32_10_ref(c: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (counter words c0..c3, key k0, k1)."""
    c0, c1, c2, c3 = (t & _M32 for t in c)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        p0 = c0 * 0xD2511F53  # wraps in int64; the low 64 bits stay exact
        p1 = c2 * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _M32, p0 & _M32
        hi1, lo1 = (p1 >> 32) & _M32, p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def dropout_threshold_ref(p: float) -> int:
    """The mask's 16-bit threshold: floor(p * 2^16), at least 1 for p > 0, at most 2^16 - 1."""
    if p <= 0.0:
        return 0
    return min(max(int(p * 65536.0), 1), 65535)


def dropout_keep_ref(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """The LoRA dropout mask (True = kept) of a [rows, cols] input: element e keeps iff the 16-bit
    half e % 2 (low first) of word (e % 8) // 2 of Philox4x32-10(counter = e // 8, key = seed) is
    >= dropout_threshold_ref(p)."""
    n = rows * cols
    q = torch.arange((n + 7) // 8, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    words = philox4x32_10_ref([q & _M32, q >> 32, zero, zero], (seed & _M32, (seed >> 32) & _M32))
    halves = torch.stack([h for w in words for h in (w & 0xFFFF, w >> 16)], dim=1)
    flat = halves.reshape(-1)[:n]
    return (flat >= dropout_threshold_ref(p)).reshape(rows, cols)


def lora_dropout_ref(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """D(x) for x [..., K], computed in fp32 (fp64 for fp64 x) and rounded to x's dtype once."""
    if p == 0.0:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    keep = dropout_keep_ref(seed, x2.shape[0], x2.shape[1], p, x.device)
    if x.dtype == torch.float64:
        scale = 1.0 / (1.0 - p)
        return torch.where(keep, x2 * scale, 0.0).reshape(x.shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()
    return torch.where(keep, x2.float() * scale, 0.0).to(x.dtype).reshape(x.shape)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``x W^T + b + scaling * D(x) A^T B^T`` in fp32 (fp64 for fp64 inputs), W dense [N, K]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xd = lora_dropout_ref(x, dropout_p, seed).to(acc)
    y = x.to(acc) @ weight.to(acc).t() + scaling * (xd @ lora_A.to(acc).t()) @ lora_B.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y


def lora_multi_ref(x: torch.Tensor, base_out: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scalings: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """``base_out[m] + scalings[a] * x[m] A[a]^T B[a]^T`` per row (a = adapter_ids[m], -1: none), fp32."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = base_out.reshape(x2.shape[0], -1).float().clone()
    for a in range(lora_A.shape[0]):
        rows = (adapter_ids == a).nonzero().flatten()
        if rows.numel():
            y[rows] += scalings[a].float() * (x2[rows] @ lora_A[a].float().t()) @ lora_B[a].float().t()
    return y.reshape(base_out.shape)


def nf4_lora_row_norm_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """DoRA's weight norm over an NF4 base: ``||dequant(W)[o] + scale * (B A)[o]||_2`` per output row,
    fp32 [out_features] (computed in float64 and rounded once)."""
    out, inf = lora_B.shape[0], lora_A.shape[1]
    w = nf4_dequantize_ref(packed, absmax, code, blocksize, (out, inf), torch.float32).double()
    v = w + scale * (lora_B.double() @ lora_A.double())
    return torch.linalg.vector_norm(v, dim=1).float()


def dense_lora_row_norm_ref(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """DoRA's weight norm over a dense base: ``||W[o] + scale * (B A)[o]||_2`` per output row, fp32
    [out_features] (computed in float64 and rounded once)."""
    v = weight.double() + scale * (lora_B.double() @ lora_A.double())
    return torch.linalg.vector_norm(v, dim=1).float()


def dora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                    x_dropped: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA over a dense ``weight`` [out, in] (HF PEFT's formula, the norm detached):
    ``y = x W^T + b + (m/n - 1) * xd W^T + (m/n) * scaling * xd A^T B^T`` with ``n = ||W + scaling B A||``
    per output row and ``xd`` the dropped-out input (``x`` when there is no dropout, which reduces it
    to ``(m/n) * (x W^T + scaling x A^T B^T) + b``)."""
    xd = x if x_dropped is None else x_dropped
    norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A).detach(), dim=1).detach()
    factor = magnitude / norm
    y = x @ weight.t() + (factor - 1) * (xd @ weight.t()) + factor * scaling * ((xd @ lora_A.t()) @ lora_B.t())
    return y if bias is None else y + bias
