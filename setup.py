"""pvkernels: a pure-Python install; the C++ extension (csrc/) is compiled with ninja through
torch.utils.cpp_extension on first import, against the torch that is running.

Why not at install time: pip builds in an isolated environment without the user's torch, and an
extension built against another torch fails to load. Building against the running torch (and
caching per torch version) avoids that trap with a plain ``pip install -e .``.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package for non-editable installs."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "pvkernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in (HERE / "csrc").iterdir():
            if src.suffix in (".cpp", ".h"):
                shutil.copy(src, target / src.name)


setup(
    name="pvkernels",
    version="0.1.0",
    description="Fused kernels for pseudo-video training of image generators",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pvkernels", "pvkernels.*", "pvkernels_models", "pvkernels_models.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        # the tested range: CI runs the compile sweep and the interpreter tests with triton 3.8 (torch 2.13's)
        # and 3.6 (torch 2.11's, the GPU machine's); 3.9 removed APIs the ecosystem still uses
        "triton": ["triton>=3.6,<3.9"],
        "models": ["scikit-learn", "scipy", "pillow"],  # scipy: the experiments' Welch t-tests
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "scipy", "scikit-learn", "pillow", "triton>=3.6,<3.9",
                 "diffusers==0.42.1"],  # test_diffusers + bench_diffusers: ~100 MB, ~15 s, no torchvision
        "bench": ["pytest-benchmark>=4", "opencv-python-headless", "matplotlib", "faiss-cpu", "kornia"],
        # the peers pvkernels.integrations is tested against; they import torchvision, so install
        # torch==2.14.1 torchvision==0.29.1 first (README "Use with other repos")
        "integrations": ["vector-quantize-pytorch==1.32.0", "phenaki-pytorch==0.5.0", "video-diffusion-pytorch==0.7.0",
                         "magvit2-pytorch==0.5.1"],
    },
    entry_points={"console_scripts": ["pvkernels-train=pvkernels_models.train:main",
                                      "pvkernels-demo=pvkernels_models.demo:main"]},
    cmdclass={"build_py": BuildPyWithSources},
)
