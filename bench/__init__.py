"""posattn benchmarks.

``python -m bench``        the benchmark CLI: posattn against torch SDPA (no PE: the ceiling),
                           the unfused ways people add a PE today (materialised ``attn_mask``,
                           a separate RoPE pass) and compiled FlexAttention; writes a markdown
                           table, a JSON file and PNG plots (``python -m bench --help``).
``pytest bench/ --benchmark-only``  a few pytest-benchmark microbenchmarks (skipped without CUDA).
``bash bench/gpu_check.sh OUTDIR``  install, compiled test suite, main command, quick benchmark.

Everything here imports on a CPU-only machine; Triton and FlexAttention load on first use.
"""
