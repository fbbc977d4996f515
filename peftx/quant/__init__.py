"""NF4 weight storage, bitsandbytes state-dict interop, and the frozen 4-bit base layer."""
