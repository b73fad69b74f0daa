"""rigl_fast: fast RigL dynamic sparse training for PyTorch.

The top-level `kernels/` (Triton) and `csrc/` (C++ sources, built on first use with torch.utils.cpp_extension
+ ninja) folders are no Python packages, so that Python started in the checkout cannot import them as `kernels`
or `csrc` (rigl_fast/_checkout.py); a build copies them into the package as rigl_fast/kernels/*.py and
rigl_fast/csrc/. An editable install reads them from the checkout. bench/ and study/ stay out of the package.
Set RIGL_FAST_BUILD_CPP=1 to prebuild the C++ extension at install time (see README).
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

# (source folder, file patterns, destination inside the built package)
_COPIED = (("kernels", ("*.py",), os.path.join("rigl_fast", "kernels")),
           ("csrc", ("*.cpp", "*.h", "*.cu"), os.path.join("rigl_fast", "csrc")))


class BuildPyWithSources(build_py):
    """build_py that also copies the Triton and C++ sources into the built package (see the docstring)."""

    def run(self):
        super().run()
        for src, patterns, dst in _COPIED:
            out = os.path.join(self.build_lib, dst)
            os.makedirs(out, exist_ok=True)
            for pattern in patterns:
                for f in sorted(glob.glob(os.path.join(src, pattern))):
                    shutil.copy2(f, out)


cmdclass, ext_modules = {"build_py": BuildPyWithSources}, []
if os.environ.get("RIGL_FAST_BUILD_CPP") == "1":
    # Prebuild the C++ ops as rigl_fast._C (docs/cpp.md); without this they are JIT-built on first use.
    # -fopenmp: at::parallel_for is inline in the headers and runs serially without it. -std=c++20: what csrc
    # needs (<bit>), explicit since older torch defaults to C++17; the same flags as rigl_fast/_cpp.py's JIT build.
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    here = os.path.dirname(os.path.abspath(__file__))
    ext_modules = [CppExtension("rigl_fast._C", sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
                                include_dirs=[os.path.join(here, "csrc")],
                                extra_compile_args=["-O3", "-fopenmp", "-std=c++20"], extra_link_args=["-fopenmp"])]

    class BuildExtWithKey(BuildExtension):
        """Also writes _C.key beside the module: the build keys of the sources it holds, so that rigl_fast._cpp
        loads it only while the installed sources are these (docs/cpp.md)."""

        def run(self):
            super().run()
            from rigl_fast._cpp import PREBUILT_KEY_FILE, prebuilt_key
            out = os.path.join(os.path.dirname(self.get_ext_fullpath("rigl_fast._C")), PREBUILT_KEY_FILE)
            with open(out, "w") as f:
                f.write(prebuilt_key(os.path.join(here, "csrc")) + "\n")

    cmdclass["build_ext"] = BuildExtWithKey

setup(
    name="rigl_fast",
    version="0.1.0",
    description="Fast, correct RigL dynamic sparse training for PyTorch (drop-in for rigl-torch)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["rigl_fast", "rigl_fast.app", "rigl_fast.integrations", "rigl_fast.kernels"],
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
