"""Deprecated location of [`hf_sara.tools.evaluation`] (now a package), kept so that existing imports keep working."""

from ._moved import forward_to

__getattr__ = forward_to(
    "hf_sara.tools.evaluation.run",
    __name__,
    fallbacks=(
        "hf_sara.tools.evaluation.sources",
        "hf_sara.tools.evaluation.tasks",
        "hf_sara.tools.evaluation.scores",
        "hf_sara.tools.evaluation.report",
    ),
)
