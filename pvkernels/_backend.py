"""Backend selection and the C++ extension loader.

The C++ extension is compiled with ninja through ``torch.utils.cpp_extension`` against the
torch that is imported at run time (so it can never be built against a different torch than
the one that loads it), and cached per torch version and target ISA: the ``-march`` used
(``PVKERNELS_MARCH``, default ``-march=native``) and the CPU features the compiler says it
implies. A build targeting a feature this CPU lacks is never loaded (a cached one is rebuilt).
A failed build leaves the reference and Triton backends working and is reported once.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
# why the fused kernels cannot take an input: one reason for both, or a function of the backend
Unsupported = Union[None, str, Callable[[str], Optional[str]]]

_cpp_state: dict = {"loaded": False, "error": None, "isa": None}


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):  # source checkout, installed copy
        if (candidate / "registration.cpp").exists():
            return candidate
    raise FileNotFoundError(f"pvkernels: C++ sources not found next to {here}")


# Compiler macros of target features -> the CPU flag names of /proc/cpuinfo (x86). A feature
# missing here is not checked; every feature here that -march=native enables must be listed by
# the CPU (tests/test_build.py), so a name mismatch would show up as a native build refused.
_FEATURE_MACROS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
    "__BMI__": "bmi1", "__BMI2__": "bmi2", "__LZCNT__": "abm", "__MOVBE__": "movbe",
    "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16", "__AVXVNNI__": "avx_vnni",
    "__AVX512VP2INTERSECT__": "avx512_vp2intersect", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__SHA__": "sha_ni",
    "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16", "__AMX_INT8__": "amx_int8",
}


def _march() -> list[str]:
    """The target flags: ``PVKERNELS_MARCH`` (shell words, e.g. "-march=x86-64-v3"), default -march=native."""
    return shlex.split(os.environ.get("PVKERNELS_MARCH", "-march=native"))


@lru_cache(maxsize=None)
def _target_macros(march: tuple) -> frozenset:
    """The macros the compiler predefines for these target flags (what simd.h branches on)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        run = subprocess.run([cxx, *march, "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True,
                             text=True, timeout=60)
    except OSError as exc:
        raise RuntimeError(f"pvkernels: the C++ compiler {cxx!r} could not be run: {exc}") from None
    if run.returncode != 0:
        # e.g. a -march newer than the compiler (GCC 12 and -march=graniterapids)
        said = next((line.strip() for line in run.stderr.splitlines() if "error" in line), run.stderr.strip())
        raise ValueError(f"pvkernels: the compiler ({cxx}) does not know {' '.join(march)} (PVKERNELS_MARCH): "
                         f"{said[:300]}")
    return frozenset(line.split()[1] for line in run.stdout.splitlines() if line.startswith("#define "))


def target_isa(march: Optional[list] = None) -> dict:
    """The ISA of a build with these flags: ``{"march", "simd", "features"}``.

    ``simd`` is the kernels' vector path as csrc/simd.h picks it ("avx512", "avx2" or "plain");
    ``features`` the CPU flags (as /proc/cpuinfo names them) the compiler may use.
    """
    march = _march() if march is None else list(march)
    macros = _target_macros(tuple(march))
    if "PVKERNELS_SIMD_PLAIN" not in macros and "__AVX512F__" in macros:
        simd = "avx512"
    elif "PVKERNELS_SIMD_PLAIN" not in macros and {"__AVX2__", "__FMA__"} <= macros:
        simd = "avx2"
    else:
        simd = "plain"
    features = sorted(flag for macro, flag in _FEATURE_MACROS.items() if macro in macros)
    return {"march": " ".join(march), "simd": simd, "features": features}


def cpu_features() -> Optional[frozenset]:
    """This CPU's feature flags (Linux /proc/cpuinfo), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def missing_features(isa: dict) -> list:
    """The features of ``isa`` this CPU lacks (none where the CPU's flags are unknown)."""
    cpu = cpu_features()
    return [] if cpu is None else [f for f in isa["features"] if f not in cpu]


def build_dir(isa: Optional[dict] = None) -> Path:
    """Where the compiled extension is cached (``PVKERNELS_BUILD_DIR`` overrides the root):
    one folder per torch version and target ISA (the -march and the features it implies)."""
    isa = target_isa() if isa is None else isa
    march = "".join(c if c.isalnum() or c in "-_." else "_" for c in isa["march"].replace("-march=", ""))[:40]
    digest = hashlib.sha1(json.dumps(isa, sort_keys=True).encode()).hexdigest()[:10]
    tag = "torch" + torch.__version__.replace("+", "_").replace(".", "_") + f"-{march}-{isa['simd']}-{digest}"
    root = os.environ.get("PVKERNELS_BUILD_DIR") or Path.home() / ".cache" / "pvkernels"
    return Path(root) / tag


_ISA_RECORD = "isa.json"  # written beside the .so after a build: the ISA it was built for


def _refuse_stale_build(path: Path) -> None:
    """Empties a cached build whose recorded ISA this CPU lacks (or that has no record), so that it
    is rebuilt instead of loaded (SIGILL)."""
    if not any(path.glob("pvkernels_cpp*.so")):
        return
    try:
        recorded = json.loads((path / _ISA_RECORD).read_text())
        missing = missing_features(recorded)
    except (OSError, ValueError, KeyError, TypeError):
        recorded, missing = None, ["(no ISA record)"]
    if missing:
        print(f"pvkernels: the cached build in {path} targets {', '.join(missing)}, which this CPU lacks: "
              "rebuilding it", file=sys.stderr, flush=True)
        shutil.rmtree(path)
        path.mkdir(parents=True)


def load_cpp(verbose: bool = False) -> bool:
    """Builds (first time for this torch and ISA) and loads the C++ extension; returns whether it is available."""
    if _cpp_state["loaded"] or _cpp_state["error"] is not None:
        return _cpp_state["loaded"]
    if os.environ.get("PVKERNELS_NO_CPP") == "1":
        _cpp_state["error"] = "disabled by PVKERNELS_NO_CPP=1"
        return False
    try:
        from torch.utils import cpp_extension

        src = _csrc_dir()
        isa = target_isa()
        missing = missing_features(isa)
        if missing:
            raise RuntimeError(f"PVKERNELS_MARCH={isa['march']!r} targets {', '.join(missing)}, which this CPU "
                               "lacks (a build for it would die with SIGILL here)")
        path = build_dir(isa)
        path.mkdir(parents=True, exist_ok=True)
        _refuse_stale_build(path)
        if not any(path.glob("pvkernels_cpp*.so")):
            print(f"pvkernels: compiling the C++ extension for torch {torch.__version__}, {isa['march']} "
                  f"({isa['simd']} kernels) into {path} (first import only, ~20 s)", file=sys.stderr, flush=True)
        sources = sorted(str(p) for p in src.glob("*.cpp"))
        flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", *_march()]
        if "__x86_64__" in _target_macros(tuple(_march())):
            flags.append("-mprefer-vector-width=512")  # loops the compiler vectorises: zmm on AVX-512
        cpp_extension.load(
            name="pvkernels_cpp",
            sources=sources,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(path),
            is_python_module=False,
            verbose=verbose,
        )
        (path / _ISA_RECORD).write_text(json.dumps(isa, indent=1))
        _cpp_state["loaded"], _cpp_state["isa"] = True, isa
    except Exception as exc:  # a failed build must never break the package
        _cpp_state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "pvkernels: the C++ extension could not be built or loaded, so the 'cpp' backend is "
            f"unavailable (reference and Triton backends still work). Reason: {_cpp_state['error'][:2000]}",
            RuntimeWarning,
            stacklevel=2,
        )
    return _cpp_state["loaded"]


def empty_cache() -> int:
    """Frees the C++ backend's cached output buffers; returns how many bytes that was.

    The cpp kernels' outputs from 64 KiB on (attention's out, dq, dk, dv, lse) take their buffers
    from a cache that keeps a freed output's buffer for the next output of its size (up to
    ``PVKERNELS_CPU_OUTPUT_CACHE_MB``, default 1024; 0 turns it off): fresh memory would be
    faulted in on every call. 0 when the C++ backend is not loaded.
    """
    if not _cpp_state["loaded"]:
        return 0
    return int(torch.ops.pvkernels_cpp.release_output_cache())


def cpp_isa() -> Optional[str]:
    """The vector path of the loaded C++ build ("avx512", "avx2", "plain"), None when it is unavailable."""
    return _cpp_state["isa"]["simd"] if load_cpp() else None


# The measured crossovers of the fused kernels: where they lose to the reference, "auto" takes the
# reference. One row per rule: op, path (the cpp build's vector path, "*" for every cpp build, or
# "cuda" for the triton kernels on a CUDA GPU), dtype ("*": any), and the shape class as (field,
# comparison, bound) on the fields of the op's fused_slower call, or a tuple of such conditions that
# must all hold (None: every shape). The README prints this table (crossover_table()) beside the
# measurements behind it; where no row matches, the fused kernels were at least as fast as the
# reference. Measured with `python -m benchmarks.cpu_isa --classes --cpu-time` (AVX2, plain),
# bench_attention.py (AVX-512, CUDA) and bench_lfq.py.
CROSSOVERS = (
    ("spatial_attention", "avx512", "bfloat16", ("n", ">=", 256)),  # SDPA multiplies in bf16 on AMX
    # fp32 past L2 (Sapphire Rapids, 8 heads): fwd+bwd 0.81x SDPA at n 4096 Dh 40, 0.64x at Dh 128
    ("spatial_attention", "avx512", "float32", ("n", ">=", 4096)),
    # AVX2 (the same CPU, -march=x86-64-v3, torch at ATEN_CPU_CAPABILITY=avx2): 0.84-1.01x from n 1024,
    # and at head dims up to 48 from n 256 (Dh 40 0.88-0.96x, Dh 48 0.93-0.96x; Dh 32 1.01-1.02x there)
    ("spatial_attention", "avx2", "float32", ("n", ">=", 1024)),
    ("spatial_attention", "avx2", "float32", (("n", ">=", 256), ("head_dim", "<=", 48))),
    ("temporal_attention", "plain", "*", ("n", ">", 8)),
    ("spatial_attention", "plain", "*", ("n", ">", 8)),
    ("spatial_attention", "plain", "float32", None),
    ("vq_lookup", "plain", "*", ("k", "<", 4096)),
    ("pseudo_video", "plain", "*", ("blur", "==", False)),
    ("lfq_entropy", "*", "*", ("d", "<=", 8)),  # the dense softmax is one small GEMM there
    # H200: the streamed (multi-block) kernels 0.16-0.39x SDPA at n 256 and 1024; one block is faster
    ("spatial_attention", "cuda", "*", ("n", ">", 32)),
    ("temporal_attention", "cuda", "*", ("n", ">", 32)),
)
_COMPARE = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}


def _matches(row, op: str, path: Optional[str], dtype: Optional[torch.dtype], shape_class: dict) -> bool:
    row_op, row_path, row_dtype, condition = row
    if row_op != op or not (row_path == path or (row_path == "*" and path != "cuda")):
        return False
    if row_dtype != "*" and (dtype is None or str(dtype).replace("torch.", "") != row_dtype):
        return False
    return all(_COMPARE[comparison](shape_class[field], bound) for field, comparison, bound in _conditions(condition))


def _conditions(condition) -> tuple:
    """A CROSSOVERS row's shape class as a tuple of (field, comparison, bound): () for None."""
    if condition is None:
        return ()
    return (condition,) if isinstance(condition[0], str) else tuple(condition)


def fused_slower(op: str, dtype: Optional[torch.dtype] = None, **shape_class) -> Callable[[str], bool]:
    """``resolve_backend(..., slower=)`` from the rows of CROSSOVERS for the fused backend: the
    loaded cpp build's vector path, or "cuda" for triton."""
    def slower(backend: str) -> bool:
        path = cpp_isa() if backend == "cpp" else "cuda" if backend == "triton" else None
        return path is not None and any(_matches(row, op, path, dtype, shape_class) for row in CROSSOVERS)
    return slower


def crossover_table() -> str:
    """CROSSOVERS as the Markdown table the README prints."""
    lines = ["| op | fused path | dtype | auto takes the reference when |", "|---|---|---|---|"]
    names = {"*": "every cpp build", "cuda": "triton on CUDA"}
    for op, path, dtype, condition in CROSSOVERS:
        shape = " and ".join(" ".join(map(str, c)) for c in _conditions(condition)) or "always"
        lines.append(f"| `{op}` | {names.get(path, 'cpp ' + path)} | {'any' if dtype == '*' else dtype} | {shape} |")
    return "\n".join(lines)


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


def is_int(x) -> bool:
    """Whether ``x`` is an integer argument: an int or a numpy int (``__index__``), not a bool."""
    return not isinstance(x, bool) and hasattr(x, "__index__")


def check_size(owner: str, name: str, value, minimum: int = 1) -> int:
    """A module's integer argument (``is_int``) of at least ``minimum``, as an int."""
    if not is_int(value):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_sizes(owner: str, **sizes) -> None:
    """``check_size`` of every keyword (a model's widths and counts), each >= 1."""
    for name, value in sizes.items():
        check_size(owner, name, value)


def check_real(owner: str, name: str, value, positive: bool = False) -> float:
    """A module's weight or constant: a finite real number (not a bool), >= 0 (``positive``: > 0), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{owner}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    """The dtype check of every op's floating inputs (float64 runs on the reference backend only)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64 (float64 on the reference "
                        f"backend only), got {x.dtype}")


def requested_backend(op: str, backend: str) -> Tuple[str, bool]:
    """What was asked for: ``(backend, preference)``. An argument other than "auto" is a demand;
    for "auto", ``PVKERNELS_BACKEND`` (when set to other than "auto") is a preference."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend, False
    env = os.environ.get("PVKERNELS_BACKEND", "auto")
    if env not in BACKENDS:
        raise ValueError(f"{op}: PVKERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env, env != "auto"


def cannot_run(op: str, backend: str, device: torch.device, dtype: torch.dtype,
               unsupported: Unsupported = None) -> Optional[Exception]:
    """Why ``backend`` cannot take this input, as the error an explicit request raises; None if it can."""
    if backend == "reference":
        return None
    if callable(unsupported):
        unsupported = unsupported(backend)
    if dtype == torch.float64:
        return TypeError(f"{op}: the {backend} backend computes in float32 and takes float32/float16/bfloat16 "
                         "inputs, got float64 (use backend='reference' for float64)")
    if backend == "cpp" and device.type != "cpu":
        return ValueError(f"{op}: backend='cpp' needs CPU tensors, got device {device}")
    if backend == "cpp" and not cpp_available():
        return RuntimeError(f"{op}: backend='cpp' requested but the C++ extension is unavailable: "
                            f"{_cpp_state['error']}")
    if backend == "triton" and triton is None:
        return RuntimeError(f"{op}: backend='triton' requested but triton is not installed "
                            "(pip install 'pvkernels[triton]')")
    if backend == "triton" and device.type != "cuda" and not triton_interpret():
        return ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                          f"the kernels on the CPU), got device {device}")
    if unsupported is not None:
        return ValueError(f"{op}: {unsupported} is not supported by the {backend} kernels; use "
                          "backend='reference' (backend='auto' does so)")
    return None


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype,
                    unsupported: Unsupported = None, slower: Optional[Callable[[str], bool]] = None) -> str:
    """The backend that runs this call: every op's dispatch.

    - An explicit ``backend`` runs as asked or raises the reason it cannot (never falls back).
    - ``PVKERNELS_BACKEND`` (with ``backend="auto"``) is a preference: that backend runs wherever it
      can take the input, the crossovers aside; where it cannot, the choice is auto's.
    - "auto": triton for CUDA tensors, cpp for CPU tensors (when built), unless that fused
      backend cannot take the input or ``slower`` says it loses at this shape class: then the
      reference.

    Args:
        unsupported: why the fused (cpp/triton) kernels cannot take this input, e.g.
            "head dim Dh = 300 > 256"; None when they can; or a function of the fused backend
            ("cpp" / "triton") returning that, where their limits differ.
        slower: the op's measured crossovers (``fused_slower``): called with the fused backend auto
            would take, True when it is slower than the reference at this input's shape class.
    """
    asked, preference = requested_backend(op, backend)
    if asked != "auto":
        problem = cannot_run(op, asked, device, dtype, unsupported)
        if problem is None:
            return asked
        if not preference:
            raise problem
    fused = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else None
    if fused is None or cannot_run(op, fused, device, dtype, unsupported) is not None:
        return "reference"
    return "reference" if slower is not None and slower(fused) else fused
