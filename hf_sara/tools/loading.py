"""Loading what a run is made of: its dataset (a local file or a Hub name), its model's `from_pretrained` arguments,
and its tokenizer, inside an adapter folder or next to its base model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..files.records import read_records, record_format

if TYPE_CHECKING:
    import torch

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# The dtypes a model is loaded in by name: "auto" (the checkpoint's) and the torch dtypes of these names.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def find_tokenizer(reference: str, **kwargs) -> PreTrainedTokenizerBase | None:
    """
    The tokenizer saved at `reference` (a folder or a Hub name), or `None` when there is none. transformers 5 builds an
    empty tokenizer (one token, encoding text to nothing) from a model folder without tokenizer files rather than
    failing, so a local folder must hold the files and the vocabulary must not be empty.
    """
    local = os.path.isdir(reference)
    if local and not any(os.path.isfile(os.path.join(reference, n)) for n in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(reference, **kwargs)
    except Exception as error:  # tokenizers raise many kinds (OSError, ValueError, JSON and Rust errors)
        if not local:
            return None
        # The folder holds tokenizer files that do not load: a damaged tokenizer, not a missing one.
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(
            f"The tokenizer files in {reference} cannot be loaded ({reason}): they are damaged or cut short; save "
            "the tokenizer used in training there again (`tokenizer.save_pretrained(folder)`)."
        ) from None
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
    if not os.path.exists(os.path.expanduser(model)):
        _check_model_exists(model, {**revision, **kwargs})
    where = f"Neither the adapter {adapter} nor the model {model} has a" if adapter else f"The model {model} has no"
    raise ValueError(
        f"{where} tokenizer: save the tokenizer used in training next to the weights "
        "(`tokenizer.save_pretrained(folder)`) and try again."
    )


def _check_model_exists(model: str, kwargs: dict) -> None:
    """Refuses a model name that is neither a local folder nor a model on the Hub (or in its local cache)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, **kwargs)
    except OSError as error:  # transformers reports a missing model, an invalid name or no connection as OSError
        raise ValueError(
            f"The model {model} was not found: it is neither a local folder nor a model on the Hub (or in its local "
            f"cache; {' '.join(str(error).split())[:150]}). Check the name or path."
        ) from None


def load_tokenizer(model: str, adapter: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """The adapter's tokenizer when it was saved with one (SARATrainer saves it), else the base model's."""
    return load_tokenizer_with_source(model, adapter, **kwargs)[0]


def load_dataset_dict(name: str, config: str | None = None):
    """A local `.jsonl`/`.json`/`.parquet`/`.csv`/`.tsv` file (as its `train` split) or a Hub dataset."""
    from datasets import DatasetDict, load_dataset

    if os.path.isfile(name):
        found = record_format(name)
        if found is None:
            raise ValueError(f"cannot read {name}: expected a .json, .jsonl, .parquet, .csv or .tsv file")
        if os.path.getsize(name) == 0:
            raise ValueError(f"{name} is empty: there is no row to read")
        builder = found.builder
        extra = {"delimiter": found.delimiter} if found.delimiter else {}
        try:
            dataset = load_dataset(builder, data_files=name, split="train", **extra)
        except Exception as error:  # the builders raise many kinds (DatasetGenerationError, ArrowInvalid, ...)
            if builder == "json":  # pyarrow names a 0-based row of its block: find the line an editor shows
                try:
                    read_records(name)
                except ValueError as located:
                    raise ValueError(
                        f"cannot read {name} as a JSON dataset ({' '.join(str(located).split())}); each row must be "
                        "one object with the same columns (JSONL: one JSON object per line)"
                    ) from None
            cause = error.__cause__ or error
            reason = " ".join(str(cause).split())[:300] or type(cause).__name__
            raise ValueError(
                f"cannot read {name} as a {builder.upper()} dataset ({reason}); each row must be one object with the "
                "same columns (JSONL: one JSON object per line)"
            ) from None
        return DatasetDict({"train": dataset})
    if os.path.exists(name) and not os.path.isdir(name):
        raise ValueError(f"cannot read {name}")
    return load_dataset(name, name=config)


def parse_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """
    The `dtype` argument of `from_pretrained` for a dtype given by name ([`DTYPE_NAMES`]): `"auto"` as it is, the
    others as the torch dtype of that name; a `torch.dtype` is returned unchanged.

    Raises:
        `ValueError`: for another name, listing those accepted.
    """
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)} or a torch.dtype, got {dtype!r}")
    return getattr(torch, dtype)


def model_init_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` arguments from TRL's `ModelConfig` and the training arguments, as `trl sft` builds them."""
    from trl import get_quantization_config

    dtype = model_args.dtype
    return dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=None if dtype is None else parse_dtype(dtype),
        quantization_config=get_quantization_config(model_args),
        **(training_args.model_init_kwargs or {}),
    )
