"""Short causal depthwise convolution (``short_conv``) in the layers' ``[B, T, C]`` layout."""

from .short_conv import short_conv

__all__ = ["short_conv"]
