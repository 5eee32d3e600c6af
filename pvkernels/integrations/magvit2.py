"""lucidrains' magvit2-pytorch: ``VideoTokenizer``'s lookup-free quantizer on ``pvkernels.lfq_entropy``.

magvit2-pytorch takes its quantizer from vector-quantize-pytorch (``LFQ``, or ``FSQ`` with
``use_fsq=True``, which has no entropy term and is left alone). The patch is the ``LFQ`` patch of
``patch_vector_quantize`` (``vector_quantize_lfq.py``): the peer's forward with its N x 2^d
entropy block on the fused op; what falls back there falls back here. The tokenizer's
convolutions, attention (its own ``Attend``, over space or time) and losses are the peer's.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import vector_quantize_lfq as lfq
from ._patching import Patch, check_peer, import_peer, missing

DISTRIBUTION = "magvit2-pytorch"
TESTED = (("0.5.1", "0.6"),)


def _peer():
    return import_peer("magvit2_pytorch.magvit2_pytorch", DISTRIBUTION)


def _check(mod, lfq_mod) -> None:
    problems = missing(mod, ("VideoTokenizer", "LFQ"), "magvit2_pytorch.magvit2_pytorch")
    if hasattr(mod, "LFQ") and hasattr(lfq_mod, "LFQ") and mod.LFQ is not lfq_mod.LFQ:
        problems.append("magvit2_pytorch's LFQ is no longer vector-quantize-pytorch's LFQ")
    check_peer(DISTRIBUTION, TESTED, problems)


def patch_magvit2(model: Optional[torch.nn.Module] = None, *, strict: bool = False) -> Patch:
    """Puts ``pvkernels.lfq_entropy`` into magvit2-pytorch's ``VideoTokenizer`` (its ``LFQ``).

    Args:
        model: a module (a ``VideoTokenizer``, ...): only its ``LFQ`` layers are patched. None
            patches vector-quantize-pytorch's ``LFQ`` class, which magvit2-pytorch uses (every
            instance, until ``unpatch()``).
        strict: raise a ValueError naming the reason instead of falling back.

    Returns:
        A :class:`Patch` (``.unpatch()``, context manager, ``.stats``).

    Example:
        >>> from magvit2_pytorch import VideoTokenizer
        >>> tokenizer = VideoTokenizer(image_size=32, init_dim=16, codebook_size=2 ** 10, use_gan=False,
        ...                            perceptual_loss_weight=0., layers=("residual", "compress_space"))
        >>> p = pvkernels.integrations.patch_magvit2(tokenizer)
        >>> loss, breakdown = tokenizer(torch.randn(1, 3, 5, 32, 32), return_loss=True)
    """
    mod = _peer()
    lfq_mod = lfq._peer()
    _check(mod, lfq_mod)
    lfq.check(lfq_mod)
    patch = Patch("magvit2", strict)
    lfq.install(patch, lfq_mod, model)
    return patch


__all__ = ["patch_magvit2", "TESTED"]
