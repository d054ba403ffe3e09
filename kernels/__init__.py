"""posattn.kernels: Triton kernels and their launchers (installed under posattn, never top-level).

Importing this package imports Triton. Set TRITON_INTERPRET=1 before that to run on CPU.
"""
