"""What cord.py needs but the paper does not say: model families, memory-bounded kernels, checkpoints and torchrun, the manifest contract."""
