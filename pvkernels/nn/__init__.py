"""Module forms of the pvkernels ops."""
from .attention import SpaceTimeBlock, SpatialAttention, TemporalAttention
from .lfq import LookupFreeQuantizer
from .pseudo_video import PseudoVideo
from .vq import VectorQuantizer

__all__ = ["LookupFreeQuantizer", "PseudoVideo", "SpaceTimeBlock", "SpatialAttention", "TemporalAttention", "VectorQuantizer"]
