"""Deprecated location of [`hf_sara.tools.demo`] and of the factories now in [`hf_sara.testing`]."""

from ._moved import forward_to

__getattr__ = forward_to(
    "hf_sara.tools.demo",
    __name__,
    fallbacks=("hf_sara.testing", "hf_sara.tools.pairs"),
    renamed={"demo_model": "tiny_qwen3_moe"},
)
