"""The mechanics every peer patch shares: replacing methods on a class or on module instances
and restoring them exactly, counting fast calls and fallbacks, and checking the peer's version
and structure before anything is touched.

A replacement never decides on its own that it is "close enough": each peer module supplies a
``reason(module, arguments) -> str | None`` check; None means the call is one pvkernels computes
exactly, a string names why not, and the original method runs instead (``strict=True`` raises).
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import types
import warnings
import weakref
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

MARK = "pvkernels"
# every patch that has replaced something (its records are found from another's unpatch)
_INSTALLED: "weakref.WeakSet[Patch]" = weakref.WeakSet()


class PeerVersionError(RuntimeError):
    """The installed peer library is not a version or structure this patch was tested against."""


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # "0rc1": stop after the numeric prefix
            break
    return tuple(parts)


def untested_allowed() -> bool:
    return os.environ.get("PVKERNELS_ALLOW_UNTESTED") == "1"


def check_peer(distribution: str, tested: Iterable[Tuple[str, str]], problems: Iterable[str]) -> str:
    """Raises PeerVersionError if ``distribution`` is outside every half-open ``[low, high)``
    range of ``tested`` or if any structural problem was found (PVKERNELS_ALLOW_UNTESTED=1 warns
    instead). Returns the installed version."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PeerVersionError(f"{distribution} is not installed (pip install 'pvkernels[integrations]')") from exc
    ranges = list(tested)
    found = list(problems)
    v = _version_tuple(version)
    if not any(_version_tuple(lo) <= v < _version_tuple(hi) for lo, hi in ranges):
        spans = " or ".join(f">={lo},<{hi}" for lo, hi in ranges)
        found.insert(0, f"{distribution} {version} is outside the tested versions ({spans})")
    if found:
        message = "; ".join(found)
        if not untested_allowed():
            raise PeerVersionError(f"pvkernels.integrations: {message}. "
                                   "Set PVKERNELS_ALLOW_UNTESTED=1 to patch anyway.")
        warnings.warn(f"pvkernels.integrations: {message}; patching anyway (PVKERNELS_ALLOW_UNTESTED=1)",
                      RuntimeWarning, stacklevel=3)
    return version


def import_peer(module: str, distribution: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerVersionError(f"pvkernels.integrations: cannot import {module} ({distribution}): {exc}") from exc


def missing(owner, names: Iterable[str], label: str) -> list:
    """Structural problems: attributes of ``owner`` (a module or class) that are gone."""
    return [f"{label}.{name} is gone" for name in names if not hasattr(owner, name)]


def signature_problems(func, expected: Iterable[str], label: str) -> list:
    """Parameters the patch relies on that ``func`` lost, and ones it gained that the patch does
    not know (a new parameter may change what the call computes)."""
    params = list(inspect.signature(func).parameters)[1:]  # without self
    expected = list(expected)
    new = [p for p in params if p not in expected and "?" + p not in expected]  # "?name": optional
    lost = [p for p in expected if p not in params and not p.startswith("?")]
    problems = [f"{label} has a new parameter {p!r}" for p in new]
    problems += [f"{label} lost its parameter {p!r}" for p in lost]
    return problems


def attention_problems(mod, params: Iterable[str], kwargs: dict, attributes: Iterable[str]) -> list:
    """Structural problems of a peer's ``mod.Attention``: its forward's parameters, and the
    attributes the patch reads on a tiny instance ``Attention(**kwargs)`` (they are set in
    ``__init__``; built with the global RNG forked); a constructor that fails is a structural
    change too."""
    problems = signature_problems(mod.Attention.forward, params, "Attention.forward")
    try:
        with torch.random.fork_rng(devices=[]):  # its Linear layers' init: making a patch draws nothing
            problems += missing(mod.Attention(**kwargs), attributes, "Attention")
    except Exception as exc:  # noqa: BLE001  a changed constructor is a structural change
        problems.append(f"Attention(**{kwargs}) failed: {exc}")
    return problems


class Patch:
    """A set of replaced methods, undone by :meth:`unpatch` (or leaving a ``with`` block).

    ``stats`` is ``{"fast": calls that ran on pvkernels' kernels, "fallback": {reason: count}}``.
    """

    def __init__(self, name: str, strict: bool = False):
        if not isinstance(strict, bool):
            raise TypeError(f"pvkernels.integrations[{name}]: strict must be True or False, got {strict!r}")
        self.name, self.strict = name, strict
        self.stats: Dict = {"fast": 0, "fallback": {}}
        self._undo: list = []
        self.modules = 0  # instances (or classes) patched

    # bookkeeping used by the replacements ---------------------------------------------------

    def fast(self) -> None:
        self.stats["fast"] += 1

    def fallback(self, reason: str) -> None:
        if self.strict:
            raise ValueError(f"pvkernels.integrations[{self.name}]: this call is not computed by pvkernels "
                             f"(strict=True): {reason}")
        counts = self.stats["fallback"]
        counts[reason] = counts.get(reason, 0) + 1

    # installing ----------------------------------------------------------------------------

    def _set(self, owner, attr: str, value) -> None:
        """Sets ``owner.attr`` (a class, or an instance's __dict__) and records how to undo it:
        [owner, attr, whether it was set there, what was, what we set]."""
        store = owner.__dict__ if isinstance(owner, type) else vars(owner)
        self._undo.append([owner, attr, attr in store, store.get(attr), value])
        _INSTALLED.add(self)
        if isinstance(owner, type):
            setattr(owner, attr, value)
        else:
            store[attr] = value

    def _while_active(self, patched: Callable, original: Callable) -> Callable:
        """``patched``, or ``original`` once this patch is undone: where a later patch wrapped this
        one's replacement and this one was undone first, or in a copy of a patched module."""
        def replacement(module, *args, **kwargs):
            return (patched if self.active else original)(module, *args, **kwargs)
        return replacement

    def replace(self, owner, attr: str, make: Callable[[Callable], Callable]) -> None:
        """Replaces method ``attr`` of ``owner`` (a class, or one nn.Module instance) by
        ``make(original)``, where ``original(module, *args, **kwargs)`` calls what was there."""
        if isinstance(owner, type):
            original = getattr(owner, attr)
            replacement = self._while_active(make(original), original)
            functools.update_wrapper(replacement, original)
            replacement.__pvkernels_patch__ = self
            self._set(owner, attr, replacement)
        else:
            # the original is called on the module the replacement is bound to: a deep copy of the
            # patched module (an EMA twin) rebinds the replacement, and must not run the source's method
            previous = vars(owner).get(attr)
            if previous is None:
                func = getattr(type(owner), attr)
            elif isinstance(previous, types.MethodType) and previous.__self__ is owner:
                func = previous.__func__
            else:  # some other callable set on the instance: called as it is
                func = lambda module, *args, **kwargs: previous(*args, **kwargs)  # noqa: E731
            replacement = self._while_active(make(func), func)
            functools.update_wrapper(replacement, getattr(type(owner), attr))
            replacement.__pvkernels_patch__ = self
            self._set(owner, attr, types.MethodType(replacement, owner))
            if isinstance(owner, nn.Module) and attr != "_replicate_for_data_parallel":
                self._rebind_in_replicas(owner)

    def _rebind_in_replicas(self, owner: nn.Module) -> None:
        """nn.DataParallel's replicas (``_replicate_for_data_parallel``) start from a shallow copy of
        the module's __dict__, where our methods are bound to the module itself: a replica would run
        the source's weights (on the source's device). The module's replication rebinds them to the
        replica (installed once per module and patch)."""
        if getattr(vars(owner).get("_replicate_for_data_parallel"), "__pvkernels_patch__", None) is self:
            return

        def make(original):
            def replicate(module):
                replica = original(module)
                store = vars(replica)
                for name, value in list(store.items()):
                    if (isinstance(value, types.MethodType) and value.__self__ is module
                            and getattr(value, "__pvkernels_patch__", None) is not None):
                        store[name] = types.MethodType(value.__func__, replica)
                return replica
            return replicate
        self.replace(owner, "_replicate_for_data_parallel", make)

    def mark(self, owner) -> None:
        """Makes ``print(model)`` say that ``owner`` (class or instance) is patched."""
        tag = f"{MARK}: {self.name}"

        def make(original):
            def extra_repr(module):
                text = original(module)
                return f"{text}, [{tag}]" if text else f"[{tag}]"
            return extra_repr
        self.replace(owner, "extra_repr", make)
        self.modules += 1

    def unpatch(self) -> None:
        """Restores every replaced method exactly (in reverse order of replacement). Where another
        patch replaced the same method since (two patches undone in the order they were made), that
        patch's record now restores what this one found, and this one's replacement, which the other
        still calls, calls straight through."""
        while self._undo:
            owner, attr, had, previous, value = self._undo.pop()
            store = owner.__dict__ if isinstance(owner, type) else vars(owner)
            if store.get(attr) is not value:
                later = [r for p in list(_INSTALLED) if p is not self for r in p._undo
                         if r[0] is owner and r[1] == attr and r[3] is value]
                if later:
                    later[0][2:4] = had, previous
                    continue
            if isinstance(owner, type):
                if had:
                    setattr(owner, attr, previous)
                else:
                    delattr(owner, attr)
            elif had:
                vars(owner)[attr] = previous
            else:
                vars(owner).pop(attr, None)

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"Patch({self.name!r}, {state}, modules={self.modules}, stats={self.stats})"


def dispatching(patch: Patch, reason: Callable, fast: Callable, signature_of) -> Callable[[Callable], Callable]:
    """The usual replacement: bind the call's arguments, ask ``reason``; on None run
    ``fast(module, arguments)`` and count it, otherwise count the reason and call the original."""
    signature = inspect.signature(signature_of)

    def make(original):
        def forward(module, *args, **kwargs):
            bound = signature.bind(module, *args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            why = reason(module, arguments)
            if why is None:
                patch.fast()
                return fast(module, arguments)
            patch.fallback(why)
            return original(module, *args, **kwargs)
        return forward
    return make


def patch_modules(patch: Patch, model: Optional[nn.Module], cls: type, makers: Dict[str, Callable]) -> None:
    """Replaces the methods named in ``makers`` (name -> ``make(original)``) on ``cls`` itself
    (model=None) or on every instance of ``cls`` in ``model``, itself included; an instance of a
    subclass with a forward of its own is left alone (its forward is not the one we reproduce)."""
    if model is None:
        owners = [cls]
    elif isinstance(model, nn.Module):
        owners = [m for m in model.modules() if isinstance(m, cls) and type(m).forward is cls.forward]
    else:
        raise TypeError(f"pvkernels.integrations: model must be an nn.Module or None, got {type(model).__name__}")
    for owner in owners:
        for attr, make in makers.items():
            patch.replace(owner, attr, make)
        patch.mark(owner)
