"""Linear4bit: a frozen NF4 base layer, differentiable with respect to its input, whose state_dict
uses bitsandbytes' ``Linear4bit`` keys."""

from __future__ import annotations

import torch
from torch import nn

from peftx.quant.matmul import nf4_matmul
from peftx.quant.nf4_weight import FLOAT_DTYPES, NF4Weight


class Linear4bit(nn.Module):
    """``y = x @ dequantize(W).T + bias`` with W stored in NF4.

    The forward never changes the stored weight (no repacking on eval), so eval or no-grad forwards
    have no effect on later training. ``compute_dtype`` (default: the input's dtype) is the dtype the
    product runs in; the output has the input's dtype.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
        self.weight = weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.compute_dtype = compute_dtype
        if bias is not None:
            if bias.shape != (weight.out_features,):
                raise ValueError(f"bias must have shape ({weight.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = NF4Weight.quantize(linear.weight.data, blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias, compute_dtype=compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        in_dtype = x.dtype
        if self.compute_dtype is not None and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.compute_dtype)
        return nf4_matmul(x, self.weight, self.bias).to(in_dtype)

    # Device moves apply to the NF4 state; dtype casts (module.half(), .to(torch.bfloat16)) never
    # touch it, since its dtypes are part of the format.
    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.to_bnb_state_dict(prefix).items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if prefix + "weight" not in own:
            missing_keys.append(prefix + "weight")
        else:
            try:
                loaded = NF4Weight.from_bnb_state_dict(own, prefix)
            except ValueError as e:
                error_msgs.append(str(e))
            else:
                if loaded.shape != self.weight.shape:
                    error_msgs.append(f"size mismatch for {prefix}weight: checkpoint has shape {loaded.shape}, "
                                      f"this module {self.weight.shape}")
                else:
                    self.weight = loaded.to(self.weight.device)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # nn.Module reports our own weight keys as missing (weight is not a parameter): undo that.
        if prefix + "weight" in own:
            while prefix + "weight" in missing_keys:
                missing_keys.remove(prefix + "weight")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}, "
                f"compute_dtype={self.compute_dtype}")
