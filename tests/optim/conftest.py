import torch

from peftx.ops.optim_reference import DYNAMIC_CODE, UNSIGNED_DYNAMIC_CODE, QUANT_BLOCK

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)


def make_fp32_case(sizes, dtype, device="cpu", seed=0, step=3.0):
    """Params, grads, random (non-zero) fp32 state and step tensors for one adamw_step call."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    grads = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    m = [(torch.randn(n, generator=g) * 0.1).to(device) for n in sizes]
    v = [(torch.rand(n, generator=g) * 0.01).to(device) for n in sizes]
    steps = [torch.tensor(step + k) for k in range(len(sizes))]
    return params, grads, m, v, steps


def make_8bit_case(sizes, dtype, device="cpu", seed=0, step=3.0):
    """Params, grads, random 8-bit state (codes and absmax) and steps for one adamw8bit_step call."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    # Gradients over many orders of magnitude exercise every part of the dynamic maps.
    grads = [(torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 1, (n,), generator=g).float()).to(dtype)
             .to(device) for n in sizes]
    blocks = [(n + QUANT_BLOCK - 1) // QUANT_BLOCK for n in sizes]
    qm = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device) for n in sizes]
    qv = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device) for n in sizes]
    am = [(torch.rand(b, generator=g) * 0.1).to(device) for b in blocks]
    av = [(torch.rand(b, generator=g) * 0.01).to(device) for b in blocks]
    steps = [torch.tensor(step + k) for k in range(len(sizes))]
    return params, grads, qm, am, qv, av, steps


def clone_all(lists):
    return [[t.clone() for t in lst] if isinstance(lst, list) else lst for lst in lists]


__all__ = ["DYNAMIC_CODE", "UNSIGNED_DYNAMIC_CODE", "HYPER", "make_fp32_case", "make_8bit_case", "clone_all"]
