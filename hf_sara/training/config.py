"""`SARAConfig`: TRL's `SFTConfig` plus the SARA settings."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig

from .arguments import SARAArguments


@dataclass
class SARAConfig(SARAArguments, SFTConfig):
    r"""
    Configuration class for the [`SARATrainer`].

    Holds every [`~trl.SFTConfig`] argument, plus the settings of the SARA routing alignment ([`SARAArguments`]:
    `sara_weight`, `sara_layers`, `sara_loss_reduction`, `sara_anchor_mode`, `sara_anchor_path`, `sara_warmup_ratio`,
    `sara_pooling`, `anchor_prefix`, `anchor_sft_weight`). The defaults are the published ones (Qwen3-30B-A3B and
    Phi-3.5-MoE-instruct need no change). One `SFTConfig` default differs: `bf16` left unset is turned on only where
    the hardware supports it (TRL turns it on everywhere, which fails on a CPU-only machine or a Colab T4). Packing
    must keep examples whole (`packing_strategy` `"bfd"` or `"bfd_split"`, not `"wrapped"`).
    """

    def __post_init__(self):
        # SFTConfig turns bf16 on by default, which fails on machines that cannot run it (a CPU, a Colab T4). Unless
        # asked for explicitly, use it only where it is available.
        if self.bf16 is None and not self.fp16:
            self.bf16 = self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()
        super().__post_init__()
        if self.packing and self.packing_strategy == "wrapped":
            raise ValueError(
                "`packing_strategy='wrapped'` cuts examples at arbitrary points, so an example's routing can no "
                "longer be paired with its anchor's. Use `packing_strategy='bfd'` or `'bfd_split'`, or "
                "`padding_free=True`."
            )
