# GPU image for hecate: CUDA toolkit + a CUDA build of torch + hecate with its CUDA kernels.
#
#   docker build -t hecate:cuda .
#   docker run --rm --gpus all --ipc=host hecate:cuda     # tools/gpu_check.sh, then the multi-GPU tests
#
# See docs/build.md (build args, multi-node runs). The toolkit (13.0) matches the torch wheel's
# CUDA (cu130) and the nvcc that tools/cuda_check.sh was written against.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

# torch is pinned: 2.14.1 built for CUDA 13.0 (about 5 GB installed with its nvidia-* wheels).
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# GPU architectures of the extension: A100 (8.0) and H100/H200 (9.0) machine code plus 9.0 PTX for
# newer GPUs, as setup.py's -gencode flags (HECATE_CUDA_ARCHS). TORCH_CUDA_ARCH_LIST matches them
# for the extensions DeepSpeed builds.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
ARG HECATE_CUDA_ARCHS="80;90"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    HECATE_CUDA_ARCHS=${HECATE_CUDA_ARCHS} \
    MAX_JOBS=8

# Python 3.11 (Ubuntu 22.04 universe) with headers for the extension build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv build-essential ninja-build git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:${PATH}

# The heavy layer first, so that source edits do not reinstall torch.
RUN pip install --upgrade pip setuptools wheel \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install ninja numpy

WORKDIR /workspace/hecate
COPY . .
# With a CUDA torch and CUDA_HOME (/usr/local/cuda) setup.py builds csrc/cuda too; fail the
# image build when the CUDA kernels did not get registered. The test extras (dev) and the
# DeepSpeed and Megatron-core adapters' extras, so their GPU tests run here instead of skipping
# (DeepSpeed compiles its CUDA ops just in time, on first use: DS_BUILD_OPS=0).
RUN DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[dev,deepspeed,megatron]" \
 && python -c "import torch, hecate._C; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('hecate::permute', 'CUDA'), 'no CUDA kernels'; \
print('hecate._C with CUDA kernels, torch', torch.__version__)" \
 && python -c "import deepspeed, megatron.core; print('deepspeed', deepspeed.__version__)"

# First run (docs/build.md): tools/gpu_check.sh on GPU 0 (build check, gpu tests, NCCL and kernel
# checks, one JSON in runs/), then on every GPU of the container the NCCL smoke test and FSSDP
# equivalence with one process at W = number of GPUs.
ENV PYTHON=python
CMD ["bash", "-c", "mkdir -p runs && tools/gpu_check.sh --out runs/gpu_check.json && N=$(nvidia-smi -L | wc -l) && torchrun --standalone --nproc-per-node=$N tests/gpu/nccl_smoke.py && torchrun --standalone --nproc-per-node=$N tests/gpu/fssdp_equivalence.py"]
