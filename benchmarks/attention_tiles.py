"""Each candidate tile of the Triton attention kernels at the temporal shapes diffusers' motion
modules meet, timed on a GPU and checked against the fp64 oracle: the measurements behind
``_TILES`` (pvkernels/ops/attention.py).

For every (shape, dtype): the table's configs, then one kernel's tile changed at a time: the
forward on 1, 2, 4 and 8 warps (and on 16 queries where the table takes 32), and the one-launch
"fused" backward on 2, 4 and 8 warps where a sequence is one block, the table's tiles with the
head dim read at run time (scalar loads: the kernels before the launchers passed it at compile
time, attention._head_dim_meta), and last the table's again (the drift over the sweep). The
projections are views of (sequences, frames, heads * head_dim) tensors, as the diffusers patch
passes them. One row per candidate: forward alone and forward + backward, median ms of 25
calls timed by CUDA events (after 3 warm-up calls; harness.time_calls), x the table's, and the
largest error of the output and its three gradients (upstream all ones) against the oracle
(attention_reference) in fp64 on the first 64 sequences.

``python -m benchmarks.attention_tiles [--quick]`` on a CUDA machine (benchmarks/gpu_check.sh runs
it); ``--quick`` one small shape, for a first look.
"""
from __future__ import annotations

import argparse

import torch

import pvkernels
from pvkernels.ops import attention
from pvkernels.ops.attention import attention_reference

from .harness import time_calls

# (sequences, frames, heads, head_dim): SD 1.5's motion modules at 320 / 640 channels (a 64x64 and
# a 32x32 latent) and the temporal benchmark's 18 frames at head dim 64
SHAPES = [(4096, 16, 8, 40), (1024, 16, 8, 80), (8192, 18, 8, 64)]


def _time(call, reps: int = 25) -> float:
    """Median ms of ``reps`` calls timed by CUDA events (the benchmarks' harness), after 3 warm-up calls."""
    for _ in range(3):
        call()
    return time_calls(call, reps, "cuda")[0] * 1e3


def _candidates(N: int, D: int, dtype: torch.dtype) -> list:
    """(name, configs, head dim at compile time) triples: the table's configs first, then one
    kernel's tile changed at a time, then the table's tiles with the head dim read at run time."""
    table = attention._configs(N, D, dtype)
    fwd = table["fwd"]
    out = [("table", table, True)]
    for w in (1, 2, 4, 8):
        if w != fwd["num_warps"]:
            out.append((f"fwd w{w}", dict(table, fwd=dict(fwd, num_warps=w)), True))
    if fwd["BLOCK_M"] > 16:
        out.append(("fwd 16 queries", dict(table, fwd=dict(fwd, BLOCK_M=16)), True))
    block = max(16, 1 << (N - 1).bit_length())
    if block <= 32:  # one block per sequence: the one-launch backward
        for w in (2, 4, 8):
            fused = attention._tile(block, block, w, 1, fwd["BLOCK_D"], interpreter=False)
            if table.get("fused") != fused:
                out.append((f"fused bwd w{w}", {"fwd": fwd, "fused": fused}, True))
    out.append(("table, runtime head dim", table, False))
    return out + [("table, again", table, True)]  # its x table: the drift between first and last


def _error(q, k, v, o, grads) -> float:
    """Largest |error| of o and its gradients (upstream all ones) against the oracle in fp64."""
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*exact, None, True, False)
    want_grads = torch.autograd.grad(want, exact, torch.ones_like(want))
    return max(float((a.detach().double() - b.detach()).abs().max()) for a, b in zip([o, *grads], [want, *want_grads]))


def sweep(shapes, dtypes) -> None:
    print("| shape (seq x frames x heads x dim) | dtype | candidate | fwd ms | x table | fwd+bwd ms | x table "
          "| max err |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    real, specialised = attention._configs, attention.SPECIALISE_HEAD_DIM
    for (n_seq, N, H, D), dtype in ((s, d) for s in shapes for d in dtypes):
        qkv = [torch.randn(n_seq, N, H * D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        q, k, v = (t.view(n_seq, N, 1, H, D) for t in qkv)
        grad = torch.randn(n_seq, N, 1, H, D, device="cuda", dtype=dtype)
        base = {}
        for name, cfg, specialise in _candidates(N, D, dtype):
            attention._configs = lambda *a, cfg=cfg: cfg
            attention.SPECIALISE_HEAD_DIM = specialise
            try:
                def fwd():
                    with torch.no_grad():
                        return pvkernels.temporal_attention(q, k, v, causal=False, backend="triton")

                def both():
                    o = pvkernels.temporal_attention(q, k, v, causal=False, backend="triton")
                    return o, torch.autograd.grad(o, (q, k, v), grad)
                # the first 64 sequences against fp64, gradients with an all-ones upstream gradient
                few = [t[:64] for t in (q, k, v)]
                o = pvkernels.temporal_attention(*few, causal=False, backend="triton")
                err = _error(*few, o, torch.autograd.grad(o, few, torch.ones_like(o)))
                t_fwd, t_both = _time(fwd), _time(both)
            except Exception as exc:  # a tile that fails to compile or launch: reported, the sweep goes on
                print(f"| {n_seq}x{N}x{H}x{D} | {str(dtype)[6:]} | {name} | failed: {str(exc).splitlines()[0][:120]} |"
                      " | | | |", flush=True)
                continue
            finally:
                attention._configs = real
                attention.SPECIALISE_HEAD_DIM = specialised
            base.setdefault("fwd", t_fwd)
            base.setdefault("both", t_both)
            print(f"| {n_seq}x{N}x{H}x{D} | {str(dtype)[6:]} | {name} | {t_fwd:.3f} | {base['fwd'] / t_fwd:.2f} "
                  f"| {t_both:.3f} | {base['both'] / t_both:.2f} | {err:.1e} |", flush=True)
        del qkv, q, k, v, grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_tiles times the GPU's tiles: it needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {attention.triton.__version__}")
    sweep([(256, 16, 8, 40)] if args.quick else SHAPES, [torch.float32, torch.bfloat16])
