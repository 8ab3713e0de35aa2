"""The depth-recurrent model: layers, the depth sampler, init, FLOP accounting."""

from recdepth.model.recurrent import Output, RecurrentLM
from recdepth.model.sampler import DepthSampler

__all__ = ["DepthSampler", "Output", "RecurrentLM"]
