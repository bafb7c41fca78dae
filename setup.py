"""Build hecate and its extension hecate._C.

The C++ (ATen) kernels are always built. The CUDA kernels are added when the
installed torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME);
set HECATE_NO_CUDA=1 to force a CPU-only build. HECATE_SKIP_EXT=1 installs the
Python package only (the Makefile then builds the extension once, in place, with
`setup.py build_ext --inplace`, so ninja's object cache in build/ is reused).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    import torch

    if os.environ.get("HECATE_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# GPU architectures: machine code for A100 (sm_80) and H100/H200 (sm_90), plus PTX of the
# newest (compute_90) that the driver JIT-compiles on newer GPUs (without it they would find
# no kernel image). HECATE_CUDA_ARCHS="90" (say) builds for fewer, e.g. one machine's GPU.
DEFAULT_CUDA_ARCHS = "80;90"


def nvcc_arch_flags(archs: str) -> list:
    """-gencode flags: sm_XX machine code for each arch in "80;90", and the newest one's PTX."""
    values = sorted({int(a) for a in archs.replace(",", ";").split(";") if a.strip()})
    if not values:
        raise ValueError(f"HECATE_CUDA_ARCHS={archs!r} names no architecture (e.g. '80;90')")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in values]
    return flags + [f"-gencode=arch=compute_{values[-1]},code=compute_{values[-1]}"]


def build_flags(with_cuda: bool) -> dict:
    """Compile and link flags of hecate._C: {"cxx": [...], "nvcc": [...], "link": [...]}.

    The C++ (ATen) CPU kernels use OpenMP in every build, the CUDA one included (a CUDA
    build that dropped -fopenmp would run the CPU kernels single-threaded).
    """
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    flags = {"cxx": cxx, "link": ["-fopenmp"]}
    if with_cuda:
        archs = os.environ.get("HECATE_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
        flags["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", *nvcc_arch_flags(archs)]
    return flags


def _extension():
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/ops.cpp"]
    define_macros = []
    with_cuda = _want_cuda()
    flags = build_flags(with_cuda)
    compile_args = {k: v for k, v in flags.items() if k != "link"}
    if with_cuda:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros.append(("HECATE_WITH_CUDA", "1"))
        return cpp_extension.CUDAExtension(
            "hecate._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=compile_args,
            extra_link_args=flags["link"],
        )
    return cpp_extension.CppExtension(
        "hecate._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=compile_args,
        extra_link_args=flags["link"],
    )

setup(
    name="hecate",
    version="0.1.0",
    description="Fully sharded sparse data parallelism (FSSDP) for Mixture-of-Experts training",
    packages=find_packages(include=["hecate", "hecate.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "rich", "safetensors"],
    extras_require={
        # tokenizers and tensorboard are optional at run time; the test suite covers them.
        # transformers is the oracle of the Hugging Face conversion tests; wandb's logger is
        # tested in offline mode.
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ninja", "matplotlib", "tokenizers",
                "tensorboard", "transformers>=5.20,<6", "wandb>=0.31,<0.32",
                "dockerfile"],  # the Go Dockerfile parser, for tests/test_dockerfile.py
        "hf": ["transformers>=5.20,<6"],
        "bpe": ["tokenizers"],
        "tensorboard": ["tensorboard"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "megatron": ["megatron-core>=0.16,<0.17"],
        "wandb": ["wandb>=0.31,<0.32"],
    },
    ext_modules=[] if os.environ.get("HECATE_SKIP_EXT") == "1" else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["hecate=hecate.cli:main"]},
)
