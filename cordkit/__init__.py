"""What cord.py needs but the paper does not say, kept apart so that cord.py reads as the paper.

Model families, memory-bounded kernels, checkpoints and torchrun, the manifest contract.
"""
