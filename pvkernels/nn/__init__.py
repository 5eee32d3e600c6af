"""Module forms of the pvkernels ops."""
from .pseudo_video import PseudoVideo

__all__ = ["PseudoVideo"]
