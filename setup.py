"""Build sparsekernels and its compiled extension `sparsekernels._C`.

Install torch first (pinned), then `pip install -e . --no-build-isolation`: the build
uses the torch in the environment, so pip never downloads another one.

The CPU kernels (csrc/cpu) are always built. The CUDA kernels (csrc/cuda) are built when
torch has CUDA and nvcc exists, unless SPARSEKERNELS_SKIP_CUDA_BUILD=1.
SPARSEKERNELS_CPU_ARCH sets -march for the CPU kernels (default: native, since the
extension is built on the machine that runs it).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sparsekernels: torch is not installed; building without the extension "
              "(install torch==2.13.0 first, then reinstall with --no-build-isolation)")
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/extension.cpp") + rel("csrc/cpu/*.cpp")
    arch = os.environ.get("SPARSEKERNELS_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-march={arch}", "-ffp-contract=fast", "-DNDEBUG"]
    extra = {"cxx": cxx}
    with_cuda = (torch.version.cuda is not None and shutil.which("nvcc") is not None
                 and not _env_flag("SPARSEKERNELS_SKIP_CUDA_BUILD"))
    if with_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        cxx.append("-DSPARSEKERNELS_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                         "-DSPARSEKERNELS_WITH_CUDA"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls("sparsekernels._C", sources, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="sparsekernels",
    version="0.1.0",
    description="Prune Transformer models and run them fast with block-sparse kernels",
    packages=find_packages(include=["sparsekernels", "sparsekernels.*"]),
    package_data={"sparsekernels": ["ops/*.json"]},
    python_requires=">=3.10",
    # torch is required but not listed: listing it lets pip replace the pinned CPU build
    # with a CUDA one. The Makefile installs torch==2.13.0 first.
    install_requires=[
        "numpy",
        "safetensors",
        "transformers>=4.40,<6",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "build": ["ninja", "pybind11"],
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib"],
        # what bench_lowp_models compares with on the dense model (n/a when absent)
        "baselines": ["openvino", "onnxruntime", "onnx"],
    },
    entry_points={"console_scripts": ["sparsekernels=sparsekernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
