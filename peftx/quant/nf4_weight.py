"""NF4Weight: a 2-D weight in bitsandbytes' NF4 format (4-bit codes, blockwise absmax, optional
double quantization), byte-equal to ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftx.ops import nf4 as nf4_ops
from peftx.ops.memory import huge_page_clone
from peftx.ops.reference import DYNAMIC_CODE, NF4_CODE

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or not (32 <= blocksize <= 4096) \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize!r}")


@dataclass
class NF4Weight:
    """A quantized ``[out_features, in_features]`` weight.

    packed:        uint8 ``[ceil(n / 2), 1]``, two codes per byte, first in the high nibble
    absmax:        fp32 ``[ceil(n / blocksize)]``, or uint8 codes of it when double-quantized
    code:          fp32 ``[16]``: the NF4 (or, for loaded checkpoints, FP4) code book
    nested_absmax, nested_code, offset: the double quantization of absmax (None otherwise)
    quant_storage: the dtype bitsandbytes stored ``packed`` as (restored on save)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_storage: torch.dtype = torch.uint8

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
        check_blocksize(blocksize)
        w = weight.detach()
        # The kernel detects NaN / inf itself (they reach a block's absmax): no extra pass over w.
        try:
            packed, absmax = nf4_ops.nf4_quantize(w, blocksize)
        except RuntimeError as e:
            if "NaN or inf" in str(e):
                raise ValueError("weight contains NaN or inf; NF4 cannot represent them") from None
            raise
        code = NF4_CODE.to(w.device)
        q = cls(packed=packed, absmax=absmax, code=code, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize)
        if double_quant and absmax.numel():
            q.absmax, q.nested_absmax, q.offset = nf4_ops.nf4_double_quantize(
                absmax, DYNAMIC_CODE.to(w.device), NESTED_BLOCKSIZE)
            q.nested_code = DYNAMIC_CODE.to(w.device)
        return q

    # --- properties ------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.double_quant:
            out.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset)
        return out

    def bits_per_parameter(self) -> float:
        """Storage per weight element: packed codes + absmax (+ nested absmax). The code books and the
        offset are format constants shared by every block and are not counted."""
        bits = self.packed.numel() * self.packed.element_size() * 8
        bits += self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            bits += self.nested_absmax.numel() * self.nested_absmax.element_size() * 8
        return bits / max(self.numel(), 1)

    # --- decoding --------------------------------------------------------------------------
    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales as fp32 (decoding the double quantization if present)."""
        if not self.double_quant:
            return self.absmax
        return nf4_ops.nf4_double_dequantize(self.absmax, self.nested_absmax, self.nested_code, self.offset,
                                             self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return nf4_ops.nf4_dequantize(self.packed, self.absmax_fp32(), self.code, self.blocksize, self.shape, dtype)

    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy on ``device`` (dtypes never change: the format is fixed)."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        if moved["packed"].device.type == "cpu" and moved["packed"] is not self.packed:
            moved["packed"] = huge_page_clone(moved["packed"])  # 2 MiB pages (peftx/ops/memory.py)
        return NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                         nested_blocksize=self.nested_blocksize, quant_storage=self.quant_storage,
                         nested_absmax=moved.get("nested_absmax"), nested_code=moved.get("nested_code"),
                         offset=moved.get("offset"), packed=moved["packed"], absmax=moved["absmax"],
                         code=moved["code"])

    # --- bitsandbytes state dicts ----------------------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        from peftx.quant.bnb_format import to_bnb_state_dict
        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "") -> "NF4Weight":
        from peftx.quant.bnb_format import from_bnb_state_dict
        return from_bnb_state_dict(state_dict, prefix)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Weight(shape={self.shape}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"quant_type={self.quant_type!r}{dq}, device={self.device})")
