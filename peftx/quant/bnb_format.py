"""Reading and writing the state-dict keys a bitsandbytes ``Linear4bit`` saves for its weight:

    weight                                  packed codes, [n_bytes / itemsize, 1] of quant_storage
    weight.absmax                           fp32 absmax, or uint8 codes when double-quantized
    weight.quant_map                        fp32 [16] code book
    weight.nested_absmax                    fp32, double quantization only
    weight.nested_quant_map                 fp32 [256], double quantization only
    weight.quant_state.bitsandbytes__<qt>   uint8 JSON: quant_type, blocksize, dtype, shape
                                            (+ nested_blocksize, nested_dtype, nested_offset)
"""

from __future__ import annotations

import json

import torch

from peftx.ops.memory import huge_page_clone
from peftx.quant.nf4_weight import NF4Weight, check_blocksize

_QS_PREFIX = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(w: NF4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    packed = w.packed
    if w.quant_storage != torch.uint8:
        packed = packed.reshape(-1).view(w.quant_storage).unsqueeze(1)
    meta = {"quant_type": w.quant_type, "blocksize": w.blocksize, "dtype": _dtype_name(w.dtype),
            "shape": list(w.shape)}
    sd = {prefix + "weight": packed, prefix + "weight.absmax": w.absmax, prefix + "weight.quant_map": w.code}
    if w.double_quant:
        sd[prefix + "weight.nested_absmax"] = w.nested_absmax
        sd[prefix + "weight.nested_quant_map"] = w.nested_code
        meta.update(nested_blocksize=w.nested_blocksize, nested_dtype="float32",
                    nested_offset=float(w.offset.item()))
    blob = json.dumps(meta).encode("utf-8")
    sd[prefix + "weight." + _QS_PREFIX + w.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def _bad(prefix: str, what: str) -> ValueError:
    return ValueError(f"state_dict: bitsandbytes 4-bit weight at prefix {prefix!r}: {what}")


def from_bnb_state_dict(sd: dict, prefix: str = "") -> NF4Weight:
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    key = prefix + "weight"
    qs_keys = [k for k in sd if k.startswith(key + "." + _QS_PREFIX)]
    if key not in sd:
        raise _bad(prefix, f"missing key {key!r}")
    if len(qs_keys) != 1:
        raise _bad(prefix, f"expected exactly one '{key}.{_QS_PREFIX}<nf4|fp4>' key, found {qs_keys}")
    quant_type = qs_keys[0].rsplit("__", 1)[1]
    if quant_type not in ("nf4", "fp4"):
        raise _bad(prefix, f"quant_type must be nf4 or fp4, got {quant_type!r}")
    try:
        meta = json.loads(bytes(sd[qs_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(prefix, f"{qs_keys[0]!r} is not valid JSON ({e})") from e

    def need(name):
        if name not in meta:
            raise _bad(prefix, f"quant state has no {name!r}")
        return meta[name]

    shape = need("shape")
    blocksize = need("blocksize")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _bad(prefix, f"shape must be [out_features, in_features], got {shape!r}")
    try:
        check_blocksize(blocksize)
    except ValueError as e:
        raise _bad(prefix, str(e)) from e
    dtype = _DTYPES.get(need("dtype"))
    if dtype is None:
        raise _bad(prefix, f"dtype must be one of {sorted(_DTYPES)}, got {meta['dtype']!r}")
    if need("quant_type") != quant_type:
        raise _bad(prefix, f"quant_type {meta['quant_type']!r} disagrees with key {qs_keys[0]!r}")
    n = shape[0] * shape[1]
    blocks = (n + blocksize - 1) // blocksize

    raw = sd[key]
    quant_storage = raw.dtype
    packed = raw.contiguous().reshape(-1).view(torch.uint8).unsqueeze(1)
    if packed.numel() < (n + 1) // 2:
        raise _bad(prefix, f"weight holds {packed.numel()} bytes, expected {(n + 1) // 2} for shape {shape}")
    # Its own memory (2 MiB pages on the CPU: the products read it in strided passes), not a view
    # into the loaded state dict.
    packed = huge_page_clone(packed[: (n + 1) // 2])

    for k in ("absmax", "quant_map"):
        if key + "." + k not in sd:
            raise _bad(prefix, f"missing key {key + '.' + k!r}")
    absmax = sd[key + ".absmax"]
    code = sd[key + ".quant_map"].float()
    if code.numel() != 16:
        raise _bad(prefix, f"quant_map must have 16 entries, got {code.numel()}")
    if absmax.numel() != blocks:
        raise _bad(prefix, f"absmax must hold {blocks} blocks for shape {shape} at blocksize {blocksize}, "
                           f"got {absmax.numel()}")
    w = NF4Weight(packed=packed, absmax=absmax, code=code.to(packed.device), shape=tuple(shape), dtype=dtype,
                  blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    nested_keys = [key + ".nested_absmax", key + ".nested_quant_map"]
    present = [k in sd for k in nested_keys]
    if any(present) or "nested_offset" in meta:
        if not all(present):
            raise _bad(prefix, f"double quantization is partial: needs {nested_keys} and nested_offset")
        if absmax.dtype != torch.uint8:
            raise _bad(prefix, f"double-quantized absmax must be uint8, got {absmax.dtype}")
        w.nested_absmax = sd[nested_keys[0]].float()
        w.nested_code = sd[nested_keys[1]].float()
        w.nested_blocksize = int(need("nested_blocksize"))
        w.offset = torch.tensor(float(need("nested_offset")), dtype=torch.float32, device=packed.device)
        if w.nested_code.numel() != 256:
            raise _bad(prefix, f"nested_quant_map must have 256 entries, got {w.nested_code.numel()}")
        nb = (blocks + w.nested_blocksize - 1) // w.nested_blocksize
        if w.nested_absmax.numel() != nb:
            raise _bad(prefix, f"nested_absmax must hold {nb} blocks, got {w.nested_absmax.numel()}")
    else:
        if absmax.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise _bad(prefix, f"absmax must be floating point without double quantization, got {absmax.dtype}")
        w.absmax = absmax.float()
    return w
