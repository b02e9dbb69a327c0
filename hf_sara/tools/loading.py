"""Loading what a saved run is made of: its tokenizer, next to a base model or inside an adapter folder."""

from __future__ import annotations

import os


def load_tokenizer(model: str, adapter: str | None = None, **kwargs):
    """The adapter's tokenizer when it was saved with one (SARATrainer saves it), else the base model's."""
    from transformers import AutoTokenizer

    if adapter is not None:
        local_without_tokenizer = os.path.isdir(adapter) and not os.path.isfile(
            os.path.join(adapter, "tokenizer_config.json")
        )
        if not local_without_tokenizer:
            try:
                return AutoTokenizer.from_pretrained(adapter, **kwargs)
            except (OSError, ValueError):
                pass
    return AutoTokenizer.from_pretrained(model, **kwargs)
