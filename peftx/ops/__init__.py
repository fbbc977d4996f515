"""peftx ops: typed wrappers over the torch.ops.peftx custom ops (see csrc/registration.cpp)."""
