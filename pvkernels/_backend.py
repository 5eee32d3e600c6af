"""Backend selection and the C++ extension loader.

The C++ extension is compiled with ninja through ``torch.utils.cpp_extension`` against the
torch that is imported at run time (so it can never be built against a different torch than
the one that loads it), once per torch version, and cached. A failed build leaves the
reference and Triton backends working and is reported once.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")

_cpp_state: dict = {"loaded": False, "error": None}


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):  # source checkout, installed copy
        if (candidate / "registration.cpp").exists():
            return candidate
    raise FileNotFoundError(f"pvkernels: C++ sources not found next to {here}")


def build_dir() -> Path:
    """Where the compiled extension is cached (``PVKERNELS_BUILD_DIR`` overrides)."""
    tag = "torch" + torch.__version__.replace("+", "_").replace(".", "_")
    root = os.environ.get("PVKERNELS_BUILD_DIR") or Path.home() / ".cache" / "pvkernels"
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_cpp(verbose: bool = False) -> bool:
    """Builds (first time) and loads the C++ extension; returns whether it is available."""
    if _cpp_state["loaded"] or _cpp_state["error"] is not None:
        return _cpp_state["loaded"]
    if os.environ.get("PVKERNELS_NO_CPP") == "1":
        _cpp_state["error"] = "disabled by PVKERNELS_NO_CPP=1"
        return False
    try:
        from torch.utils import cpp_extension

        src = _csrc_dir()
        if not any(build_dir().glob("pvkernels_cpp*.so")):
            print(f"pvkernels: compiling the C++ extension for torch {torch.__version__} into {build_dir()} "
                  "(first import only, ~20 s)", file=sys.stderr, flush=True)
        sources = sorted(str(p) for p in src.glob("*.cpp"))
        flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-mprefer-vector-width=512", os.environ.get("PVKERNELS_MARCH", "-march=native")]
        cpp_extension.load(
            name="pvkernels_cpp",
            sources=sources,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(build_dir()),
            is_python_module=False,
            verbose=verbose,
        )
        _cpp_state["loaded"] = True
    except Exception as exc:  # a failed build must never break the package
        _cpp_state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "pvkernels: the C++ extension could not be built or loaded, so the 'cpp' backend is "
            f"unavailable (reference and Triton backends still work). Reason: {_cpp_state['error'][:2000]}",
            RuntimeWarning,
            stacklevel=2,
        )
    return _cpp_state["loaded"]


def cpp_available() -> bool:
    return load_cpp()


# The one place that imports triton: the ops (and ops/rng.py) take ``triton`` from here.
try:
    import triton
except ImportError:  # the reference and cpp backends work without triton
    triton = None


def triton_available() -> bool:
    return triton is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    """The dtype check of every op's floating inputs (float64 runs on the reference backend only)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64 (float64 on the reference "
                        f"backend only), got {x.dtype}")


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype,
                    unsupported: Optional[str] = None, slower: Optional[Callable[[str], bool]] = None) -> str:
    """Maps ``backend`` ("auto" honours ``PVKERNELS_BACKEND``) to the one that will run: every op's dispatch.

    An explicitly requested backend that cannot run raises; only "auto" chooses.

    Args:
        unsupported: why the fused (cpp/triton) kernels cannot take this input, e.g.
            "head dim Dh = 160 > 128"; None when they can. "auto" (also when ``PVKERNELS_BACKEND``
            names a fused backend) then takes the reference; an explicit request raises ValueError.
        slower: the op's measured crossovers: called with the fused backend "auto" would take,
            True when that backend is slower than the reference at this input's shape class, and
            then "auto" takes the reference. Explicit requests (and ``PVKERNELS_BACKEND``) run as asked.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    auto = backend == "auto"
    if auto:
        env = os.environ.get("PVKERNELS_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"{op}: PVKERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        fused = None
        if device.type == "cuda" and triton is not None:
            fused = "triton"
        elif device.type == "cpu" and cpp_available():
            fused = "cpp"
        if fused is None or dtype == torch.float64 or unsupported is not None or (slower is not None and slower(fused)):
            return "reference"
        return fused
    if auto and unsupported is not None:
        return "reference"
    if backend in ("cpp", "triton") and dtype == torch.float64:
        raise TypeError(f"{op}: the {backend} backend computes in float32 and takes float32/float16/bfloat16 "
                        "inputs, got float64 (use backend='reference' for float64)")
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpp' needs CPU tensors, got device {device}")
        if not cpp_available():
            raise RuntimeError(f"{op}: backend='cpp' requested but the C++ extension is unavailable: "
                               f"{_cpp_state['error']}")
    if backend == "triton":
        if triton is None:
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not installed "
                               "(pip install 'pvkernels[triton]')")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                             f"the kernels on the CPU), got device {device}")
    if backend != "reference" and unsupported is not None:
        raise ValueError(f"{op}: {unsupported} is not supported by the {backend} kernels; use backend='reference' "
                         "(backend='auto' does so)")
    return backend
