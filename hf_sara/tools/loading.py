"""Loading what a saved run is made of: its tokenizer, inside an adapter folder or next to its base model."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def find_tokenizer(reference: str, **kwargs) -> PreTrainedTokenizerBase | None:
    """
    The tokenizer saved at `reference` (a folder or a Hub name), or `None` when there is none. transformers 5 builds an
    empty tokenizer (one token, encoding text to nothing) from a model folder without tokenizer files rather than
    failing, so a local folder must hold the files and the vocabulary must not be empty.
    """
    if os.path.isdir(reference) and not any(os.path.isfile(os.path.join(reference, n)) for n in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(reference, **kwargs)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer if len(tokenizer) > 1 else None


def load_tokenizer_with_source(
    model: str, adapter: str | None = None, model_revision: str | None = None, **kwargs
) -> tuple[PreTrainedTokenizerBase, str]:
    """
    The adapter's tokenizer when it was saved with one (SARATrainer saves it), else the base model's, and which one
    it is (`"adapter"` or `"base model"`).

    Raises:
        `ValueError`: when neither has one, naming the fix.
    """
    if adapter is not None and (tokenizer := find_tokenizer(adapter, **kwargs)) is not None:
        return tokenizer, "adapter"
    revision = {"revision": model_revision} if model_revision else {}
    if (tokenizer := find_tokenizer(model, **revision, **kwargs)) is not None:
        return tokenizer, "base model"
    where = f"Neither the adapter {adapter} nor the model {model}" if adapter else f"The model {model}"
    raise ValueError(
        f"{where} has a tokenizer: save the tokenizer used in training next to the weights "
        "(`tokenizer.save_pretrained(folder)`) and try again."
    )


def load_tokenizer(model: str, adapter: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """The adapter's tokenizer when it was saved with one (SARATrainer saves it), else the base model's."""
    return load_tokenizer_with_source(model, adapter, **kwargs)[0]
