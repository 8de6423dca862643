"""Triton kernels of fastrit, installed as ``fastrit.kernels``.

Never installed as a top-level ``kernels`` package: that name belongs to another PyPI package
that bitsandbytes imports. The kernels themselves arrive with the kernel-layer issue; until then
every op runs on its PyTorch reference.
"""
