"""posattn: positional encodings fused into FlashAttention-style Triton kernels.

`kernels/` is installed as the subpackage `posattn.kernels` (never as a top-level `kernels`
module: that name belongs to Hugging Face's distribution, which transformers imports). It has
no __init__.py, so that run from the repository root it cannot shadow that distribution
(posattn/__init__.py says how).
"""
from setuptools import setup

setup(
    name="posattn",
    version="0.1.0",
    description="Positional encodings (RoPE + scalings, ALiBi, KERPLE) fused into Triton attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["posattn", "posattn.extrapolate", "posattn.kernels"],
    package_dir={"posattn": "posattn", "posattn.kernels": "kernels"},
    install_requires=[
        # Not pinned: GPU users bring their own CUDA build of torch.
        "torch>=2.4",
        # CUDA builds of torch pin triton exactly (torch 2.11 -> triton 3.6.0), so the floor must
        # admit 3.6. The CPU interpreter needs >=3.7 with numpy>=2.4 (.ci/run installs that).
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # transformers: the RoPE-scaling parity tests compare against its own rope utilities,
        # the T5 test against its T5Attention, posattn.hf's tests against its eager models. kernels (Hugging Face's): the test that
        # this repository's kernels/ folder never shadows it. matplotlib: the study's plots.
        # ruff: .ci/run's lint step.
        "test": ["pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "transformers>=5",
                 "kernels", "matplotlib", "ruff"],
        "bench": ["matplotlib"],
        # posattn.hf (attn_implementation="posattn", fuse()): its attention and mask interfaces
        "hf": ["transformers>=5"],
    },
)
