"""Deprecated location of [`hf_sara.tools.evaluation`], kept so that existing imports keep working."""

from ._moved import forward_to

__getattr__ = forward_to("hf_sara.tools.evaluation", __name__)
