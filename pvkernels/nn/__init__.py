"""Module forms of the pvkernels ops."""
from .pseudo_video import PseudoVideo
from .vq import VectorQuantizer

__all__ = ["PseudoVideo", "VectorQuantizer"]
