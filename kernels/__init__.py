"""Triton kernels of rigl_fast (installed as `rigl_fast.kernels`). See rigl_fast/ops.py for the contract."""
