"""Liger-style parity: the same model trained a few steps unpatched and patched, compared.

``train`` runs ``steps`` optimiser steps and records, per step, the loss and named outputs, the
gradient of the input and of every parameter; at the end every state_dict entry (parameters and
buffers, EMA statistics included). Inputs come from their own generator and the global RNG is
reseeded before every step, so both runs see the same data and the peer draws the same numbers.
"""
from __future__ import annotations

import copy
import importlib.metadata

import torch

from ..utils import assert_close


def train(model, make_input, step, steps: int = 5, lr: float = 0.05):
    """``make_input(generator) -> x``; ``step(model, x) -> (loss, {name: tensor})``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if params else None
    gen = torch.Generator().manual_seed(1234)
    records = []
    for i in range(steps):
        x = make_input(gen)
        if x.is_floating_point():
            x.requires_grad_(True)
        torch.manual_seed(100 + i)
        loss, outputs = step(model, x)
        if loss.requires_grad:  # eval mode: nothing to differentiate
            loss.backward()
        record = {"loss": loss.detach().clone(), **{k: v.detach().clone() for k, v in outputs.items()}}
        if x.grad is not None:
            record["input.grad"] = x.grad.clone()
        for name, p in model.named_parameters():
            if p.grad is not None:
                record[f"{name}.grad"] = p.grad.clone()
        records.append(record)
        if opt is not None:
            opt.step()
            opt.zero_grad()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return records, final


def compare(ref, fast, rtol: float = 1e-4, atol: float = 1e-5, exact=("indices",)) -> None:
    """Every recorded tensor and every final state entry of ``fast`` against ``ref``. Gradients
    are compared with an absolute tolerance scaled by the tensor's largest gradient (a gradient
    that is only rounding noise, e.g. of a per-head constant bias under softmax, stays noise)."""
    (ref_records, ref_final), (fast_records, fast_final) = ref, fast
    for i, (r, f) in enumerate(zip(ref_records, fast_records)):
        assert r.keys() == f.keys(), f"step {i}: recorded {sorted(set(r) ^ set(f))} on one side only"
        for name, expected in r.items():
            label = f"step {i}: {name}"
            if any(name.startswith(e) for e in exact):
                assert torch.equal(f[name], expected), f"{label}: {int((f[name] != expected).sum())} entries differ"
            elif name.endswith(".grad"):
                scale = float(expected.abs().max()) if expected.numel() else 0.0
                assert_close(f[name], expected, rtol=rtol, atol=max(atol * scale, 1e-8), name=label)
            else:
                assert_close(f[name], expected, rtol=rtol, atol=atol, name=label)
    assert ref_final.keys() == fast_final.keys(), "state_dict keys differ"
    for name, expected in ref_final.items():
        if expected.is_floating_point():
            assert_close(fast_final[name], expected, rtol=rtol, atol=atol, name=f"final {name}")
        else:
            assert torch.equal(fast_final[name], expected), f"final {name} differs"


def instance_and_class(build, patch_fn, make_input, step, steps: int = 5, **tolerances):
    """Trains ``build()`` unpatched, a deep copy patched by instance, and a freshly built model
    (same seed) under the class-level patch; compares both with the first. Returns both Patches."""
    torch.manual_seed(0)
    model = build()
    twin = copy.deepcopy(model)
    ref = train(model, make_input, step, steps)

    by_instance = patch_fn(twin)
    compare(ref, train(twin, make_input, step, steps), **tolerances)
    by_instance.unpatch()

    with patch_fn(None) as by_class:
        torch.manual_seed(0)
        fresh = build()
        compare(ref, train(fresh, make_input, step, steps), **tolerances)
    return by_instance, by_class


def patched_copy(model, reference):
    """A deep copy of the patched ``model`` (as a trainer copies it for its EMA), its weights and
    those of ``reference`` (an unpatched copy of ``model``) scaled alike: the copy must run its own."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in (twin, reference):
            for p in m.parameters():
                p.mul_(1.5)
    return twin


def replica(model, reference, monkeypatch):
    """What nn.DataParallel runs on a second device, here on the CPU: torch's own replicate() of
    ``model``, its broadcast a copy; the replica's weights and those of ``reference`` (an
    unpatched copy of ``model``) scaled alike: the replica must run its own."""
    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.detach().clone() for t in tensors] for _ in devices])
    twin = replicate.replicate(model, [0])[0]
    with torch.no_grad():
        for source, copied in zip(model.modules(), twin.modules()):
            for name, p in source._parameters.items():
                if p is not None:
                    vars(copied)[name].mul_(1.5)  # a replica's parameters are plain attributes
        for p in reference.parameters():
            p.mul_(1.5)
    return twin


def fake_version(monkeypatch, package: str, version: str) -> None:
    """importlib.metadata.version says ``version`` for ``package`` (every other package as installed)."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == package else real(name))
