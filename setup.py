"""rigl_fast: fast RigL dynamic sparse training for PyTorch.

The top-level `kernels/` folder (Triton) installs as `rigl_fast.kernels`; `csrc/` (C++ sources, built on
first use with torch.utils.cpp_extension + ninja) installs as package data `rigl_fast/csrc`.
Set RIGL_FAST_BUILD_CPP=1 to prebuild the C++ extension at install time (see README).
"""
import os

from setuptools import setup

cmdclass, ext_modules = {}, []
if os.environ.get("RIGL_FAST_BUILD_CPP") == "1":
    # Prebuild the C++ ops as rigl_fast._C (docs/cpp.md); without this they are JIT-built on first use.
    # -fopenmp: at::parallel_for is inline in the headers and runs serially without it. -std=c++20: what csrc
    # needs (<bit>), explicit since older torch defaults to C++17; the same flags as rigl_fast/_cpp.py's JIT build.
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    import glob
    here = os.path.dirname(os.path.abspath(__file__))
    ext_modules = [CppExtension("rigl_fast._C", sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
                                include_dirs=[os.path.join(here, "csrc")],
                                extra_compile_args=["-O3", "-fopenmp", "-std=c++20"], extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="rigl_fast",
    version="0.1.0",
    description="Fast, correct RigL dynamic sparse training for PyTorch (drop-in for rigl-torch)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["rigl_fast", "rigl_fast.app", "rigl_fast.integrations", "rigl_fast.kernels", "rigl_fast.csrc"],
    package_dir={"rigl_fast": "rigl_fast", "rigl_fast.kernels": "kernels", "rigl_fast.csrc": "csrc"},
    package_data={"rigl_fast.csrc": ["*.cpp", "*.h", "*.cu"]},
    install_requires=["torch>=2.2", "numpy", "ninja"],
    extras_require={
        "cli": ["scikit-learn", "tqdm", "matplotlib", "mnist1d"],  # mnist1d: generated locally (make_dataset), never downloaded
        # transformers / accelerate: the real-model tests build tiny models from configs (never downloaded)
        "test": ["pytest", "scikit-learn", "tqdm", "matplotlib", "mnist1d", "triton==3.7.1", "transformers>=5", "accelerate", "lightning"],
    },
    entry_points={"console_scripts": ["rigl-fast=rigl_fast.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
