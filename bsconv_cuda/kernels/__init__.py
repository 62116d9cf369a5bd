"""Triton kernels of bsconv_cuda (one module per kernel family). Importing this package needs Triton."""
