"""Compiles planned Triton launches for a GPU target without a GPU and reads their resources.

Runs in a process without TRITON_INTERPRET (the kernels must be JIT functions, not the
interpreter's). A launch is specialised exactly as ``kernel[grid](*args, **kwargs)`` would be on
a device (triton's own binder: pointer alignment, integers equal to 1 or divisible by 16,
constexprs, options), compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, and
its cubin read by the wheel's ``cuobjdump --dump-resource-usage`` (registers, stack = spill
bytes per thread, static shared); ``metadata.shared`` is the dynamic shared memory; its PTX gives
the global load instructions per thread and how many of them load vectors (ld.global.v2 / v4).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# per-SM limits (CUDA occupancy calculator): registers, warps, blocks, shared bytes, shared per block
SM_LIMITS = {80: (65536, 64, 32, 167936, 166912), 90: (65536, 64, 32, 233472, 232448)}
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# a global load in the PTX: its opcode, with the vector width (ld.global.v4.b32) or without (ld.global.b16)
_GLOBAL_LOAD = re.compile(r"\bld\.global[.\w]*")


def specialise(kernel, args: tuple, kwargs: dict, target: GPUTarget):
    """(signature, constexprs, attrs, options) of ``kernel[grid](*args, **kwargs)`` on ``target``:
    ``kwargs`` holds the arguments passed by name and the meta (constexprs, warps, stages)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def variant_key(kernel, args: tuple, kwargs: dict) -> str:
    """What makes two launches the same tiles and code (target aside): argument types, constexprs,
    warps and stages. Launches that differ only in which integers divide by 16 (alignment hints)
    share a key; the first one planned stands for them."""
    signature, constexprs, _, options = specialise(kernel, args, kwargs, GPUTarget("cuda", 90, 32))
    return json.dumps([kernel.fn.__name__, signature, sorted((str(k), str(v)) for k, v in constexprs.items()),
                       options.num_warps, options.num_stages])


def occupancy(arch: int, registers: int, shared: int, warps: int) -> tuple[int, float]:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill."""
    max_regs, max_warps, max_blocks, smem_sm, smem_block = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = max_regs // (regs_per_warp * warps)
    by_smem = smem_sm // (shared + 1024) if shared <= smem_block else 0  # 1 KB reserved per block
    blocks = min(max_blocks, max_warps // warps, by_regs, by_smem)
    return blocks, blocks * warps / max_warps


def compile_variant(kernel, args: tuple, kwargs: dict, arch: int) -> dict:
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = specialise(kernel, args, kwargs, target)
    row = {"kernel": kernel.fn.__name__, "target": f"sm_{arch}"}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as exc:  # reported as a failing row, never swallowed
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return row
    loads = _GLOBAL_LOAD.findall(compiled.asm["ptx"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = _USAGE.search(dump)
    registers, stack, static_shared, local = (int(g) for g in usage.groups())
    shared = compiled.metadata.shared + static_shared
    blocks, occ = occupancy(arch, registers, shared, compiled.metadata.num_warps)
    row.update(registers=registers, stack=stack, local=local, dynamic_shared=compiled.metadata.shared,
               static_shared=static_shared, warps=compiled.metadata.num_warps, stages=compiled.metadata.num_stages,
               blocks_per_sm=blocks, occupancy=round(occ, 4), global_loads=len(loads),
               vector_loads=sum(".v2." in op or ".v4." in op for op in loads))
    return row


def describe(kernel, args: tuple, kwargs: dict) -> str:
    """A readable variant name: the first pointer's dtype and the constexpr arguments."""
    signature, constexprs, _, options = specialise(kernel, args, kwargs, GPUTarget("cuda", 90, 32))
    dtypes = [t[1:] for t in signature.values() if isinstance(t, str) and t.startswith(("*fp", "*bf"))]
    dtype = "/".join(dict.fromkeys(dtypes[:1] + [t for t in dtypes if t != "fp32"]))  # first, then any 16-bit
    names = [p.name for p in kernel.params]
    consts = " ".join(f"{names[path[0]]}={int(v) if isinstance(v, bool) else v}" for path, v in constexprs.items()
                      if names[path[0]] == names[path[0]].upper())
    return f"{dtype} {consts} w{options.num_warps} s{options.num_stages}"
