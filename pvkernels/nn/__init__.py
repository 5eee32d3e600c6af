"""Module forms of the pvkernels ops."""
from .attention import SpaceTimeBlock, SpatialAttention, TemporalAttention
from .pseudo_video import PseudoVideo
from .vq import VectorQuantizer

__all__ = ["PseudoVideo", "SpaceTimeBlock", "SpatialAttention", "TemporalAttention", "VectorQuantizer"]
