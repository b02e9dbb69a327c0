"""Paired routing, measured: each pair's example and anchor tokenized once, the routing of both and their per-layer
Jensen-Shannon divergence measured batch by batch, and the pairs reduced per language into a `RoutingReport`.
[`analyze_routing`] runs it on one process; [`RoutingDivergenceCallback`] runs it with the batches dealt over the
trainer's ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational

from ..distributed import deal_batches
from ..routing.capture import eval_mode, routing_distributions
from ..routing.loss import js_divergence
from ..training.paired_data import (
    MESSAGES_FIELDS,
    PROMPT_COMPLETION_FIELDS,
    TOKENIZED_FIELDS,
    PairedFormat,
    anchored_rows,
    anchored_subset,
    languages_of,
)

ANCHOR_LANGUAGE = "anchor"
UNKNOWN_LANGUAGE = "unknown"


@dataclass
class RoutingReport:
    """
    Routing of one model on a paired dataset.

    Attributes:
        divergence (`dict[str, torch.Tensor]`):
            Per language, the mean JS divergence between its examples' routing and their anchors', per MoE layer
            (`[n_moe_layers]`).
        usage (`dict[str, torch.Tensor]`):
            Per language (and `"anchor"` for the anchors), the mean routing distribution, `[n_moe_layers, n_experts]`.
        counts (`dict[str, int]`):
            Number of pairs per language.
    """

    divergence: dict[str, torch.Tensor]
    usage: dict[str, torch.Tensor]
    counts: dict[str, int]

    def mean_divergence(self, layers: list[int] | None = None) -> dict[str, float]:
        return {
            language: (values if layers is None else values[layers]).mean().item()
            for language, values in self.divergence.items()
        }


@dataclass(frozen=True)
class EncodedPairs:
    """
    The pairs of a paired dataset that have an anchor, tokenized, in the dataset's order (see [`encode_pairs`]).

    Attributes:
        examples (`list[list[int]]`):
            The token ids of each pair's example.
        anchors (`list[list[int]]`):
            The token ids of each pair's anchor.
        languages (`list[str]`):
            Each pair's language (`"unknown"` where it has none).
        pad_token_id (`int`):
            What pads a batch (after the sequences, which the attention mask leaves out).
    """

    examples: list[list[int]]
    anchors: list[list[int]]
    languages: list[str]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.examples)


def _token_ids(
    dataset: Dataset,
    paired_format: PairedFormat,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    anchors: bool,
) -> list[list[int]]:
    """The token ids of one side of a paired dataset (the anchors' with `anchors=True`), one list per row."""
    truncation = {"truncation": max_length is not None, "max_length": max_length}
    columns = [(paired_format.anchor_prefix if anchors else "") + name for name in paired_format.fields]
    if paired_format.fields == TOKENIZED_FIELDS:
        sequences = [list(ids) for ids in dataset[columns[0]]]
        if max_length is None:
            return sequences
        left = getattr(tokenizer, "truncation_side", "right") == "left"
        return [ids[-max_length:] if left else ids[:max_length] for ids in sequences]
    sequences = []
    for values in zip(*(dataset[column] for column in columns), strict=True):
        example = dict(zip(paired_format.fields, values, strict=True))
        if is_conversational(example):
            messages = example.get(MESSAGES_FIELDS[0]) or [
                turn for name in PROMPT_COMPLETION_FIELDS for turn in example[name]
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            sequences.append(tokenizer(text, add_special_tokens=False, **truncation)["input_ids"])
        else:
            sequences.append(tokenizer("".join(values), **truncation)["input_ids"])
    return sequences


def encode_pairs(
    dataset: Dataset,
    paired_format: PairedFormat,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = 512,
    vocab_size: int | None = None,
) -> EncodedPairs:
    """
    Tokenizes the pairs of `dataset` that have an anchor (rows without one are skipped), both sides alike.

    Plain text is `prompt + completion`, or the text, tokenized with the tokenizer's special tokens; conversational
    rows (`messages`, or conversational `prompt`/`completion`) go through the tokenizer's chat template, the whole
    conversation at once; tokenized rows (`input_ids`) are taken as they are. Everything is truncated to `max_length`.

    Args:
        dataset ([`~datasets.Dataset`]):
            Pairs in `paired_format`, with an optional `language` column (rows without one count as `"unknown"`).
        paired_format ([`PairedFormat`]):
            Their format, see [`detect_paired_format`].
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        max_length (`int` or `None`, *optional*, defaults to `512`):
            Truncation length.
        vocab_size (`int`, *optional*):
            The model's vocabulary size (rows of its input embeddings): token ids outside `[0, vocab_size)` are
            refused, naming the rows.

    Returns:
        [`EncodedPairs`]

    Raises:
        `ValueError`: when no row has an anchor, a row's anchor is incomplete (see [`anchored_rows`]), a row's
            example or anchor has no token, or (with `vocab_size`) a token id the model does not have; the rows are
            those of `dataset`.
    """
    rows = [index for index, flag in enumerate(anchored_rows(dataset, paired_format)) if flag]
    if not rows:
        anchored_subset(dataset, paired_format)  # refuses: no row has an anchor
    dataset = dataset.select(rows)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = EncodedPairs(
        examples=_token_ids(dataset, paired_format, tokenizer, max_length, anchors=False),
        anchors=_token_ids(dataset, paired_format, tokenizer, max_length, anchors=True),
        languages=languages_of(dataset, missing=UNKNOWN_LANGUAGE),
        pad_token_id=pad_token_id if pad_token_id is not None else 0,
    )
    for side, sequences in (("example", pairs.examples), ("anchor", pairs.anchors)):
        empty = [rows[index] for index, ids in enumerate(sequences) if not ids]
        if empty:
            raise ValueError(
                f"Row(s) {_shown(empty)} of the pairs have an empty {side} (no token to measure): drop those rows or "
                "give them a text."
            )
        if vocab_size is not None:
            outside = [rows[index] for index, ids in enumerate(sequences) if any(not 0 <= i < vocab_size for i in ids)]
            if outside:
                raise ValueError(
                    f"Row(s) {_shown(outside)} of the pairs have {side} token ids outside the model's vocabulary "
                    f"(0 to {vocab_size - 1}): tokenize them with this model's tokenizer."
                )
    return pairs


def model_vocab_size(model: nn.Module) -> int | None:
    """The number of token ids a model embeds (its input embeddings' rows), or `None` when it cannot tell."""
    try:
        return model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None


def _shown(rows: list[int], limit: int = 10) -> str:
    return str(rows[:limit]) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _padded(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, as a tokenizer pads a batch to its longest sequence."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def pair_routing(
    model: nn.Module,
    pairs: EncodedPairs,
    rows: range,
    device: torch.device | None = None,
    last_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The routing of some pairs, from one forward of their examples and one of their anchors (each a right-padded
    batch; without the logits, `logits_to_keep=1`, nor the load-balancing loss), each ending after the router of
    `last_layer` where it can (see `capture_routing`'s `stop_after`).

    Args:
        model (`torch.nn.Module`):
            A model patched with [`patch_model`] (or the engine that runs it).
        pairs ([`EncodedPairs`]):
            The pairs.
        rows (`range`):
            Which pairs: one batch.
        device (`torch.device`, *optional*):
            Where the batches go; defaults to the device of the model's first parameter.
        last_layer (`int`, *optional*):
            The last captured MoE layer measured (by default every one).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`, on the CPU: per pair, the JS divergence between the
        example's routing and the anchor's per measured MoE layer (`[rows, layers]`), the example's routing and
        the anchor's (`[rows, layers, n_experts]`).
    """
    device = device if device is not None else next(model.parameters()).device
    routing = []
    for sequences in (pairs.examples, pairs.anchors):
        input_ids, attention_mask = _padded([sequences[row] for row in rows], pairs.pad_token_id, device)
        distributions = routing_distributions(
            model, input_ids, attention_mask, stop_after=last_layer, logits_to_keep=1, output_router_logits=False
        )
        routing.append(distributions.cpu())
    examples, anchors = routing
    return js_divergence(examples, anchors), examples, anchors


@torch.no_grad()
def measure_pairs(
    model: nn.Module,
    pairs: EncodedPairs,
    batch_size: int = 16,
    process_index: int = 0,
    num_processes: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    last_layer: int | None = None,
) -> tuple[RoutingReport, int]:
    """
    Measures, per language and MoE layer, how far the examples' routing is from their anchors', with `model` as it is
    now (in eval mode, without gradient): [`pair_routing`] of every batch of `batch_size` pairs, dealt round-robin
    over the ranks ([`deal_batches`]), then reduced per language in the pairs' order, so that any number of ranks
    gives the report of one process. Every rank must call it (it runs collectives).

    Args:
        model (`torch.nn.Module`):
            A model patched with [`patch_model`], or the engine that runs it (FSDP2 and ZeRO-3 gather their shards in
            its forward).
        pairs ([`EncodedPairs`]):
            The pairs, see [`encode_pairs`].
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward.
        process_index (`int`, *optional*, defaults to `0`), num_processes (`int`, *optional*, defaults to `1`):
            This rank and the number of ranks.
        gather (`Callable`, *optional*):
            All-gathers a CPU tensor of the same shape on every rank along dim 0 and returns it on the CPU; needed
            when `num_processes > 1`.
        last_layer (`int`, *optional*):
            The last captured MoE layer measured: the forwards end after its router where they can. By default,
            every layer.

    Returns:
        `tuple[RoutingReport, int]`: the [`RoutingReport`] (the same on every rank), and how many pairs this rank
        measured.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, not {batch_size}.")
    languages = list(dict.fromkeys(pairs.languages))
    language_of_pair = torch.tensor([languages.index(language) for language in pairs.languages])
    batches = [range(start, min(start + batch_size, len(pairs))) for start in range(0, len(pairs), batch_size)]
    divergences = []  # [batch, n_moe_layers] per gathered round: every pair's, small
    usage = None  # per language, then the anchors: summed routing (fp64), `[n_languages + 1, n_moe_layers, n_experts]`
    measured = 0
    with eval_mode(model):
        device = next(model.parameters()).device
        rounds = deal_batches(
            [len(rows) for rows in batches],
            lambda batch: pair_routing(model, pairs, batches[batch], device, last_layer),
            process_index,
            num_processes,
            gather,
        )
        for round_ in rounds:
            js, examples, anchors = round_.values
            rows = torch.tensor([row for batch in round_.batches for row in batches[batch]])
            if usage is None:
                usage = torch.zeros(len(languages) + 1, *examples.shape[1:], dtype=torch.float64)
            # Summed one pair after the other in the pairs' order, whatever the number of ranks: the same bits.
            usage.index_add_(0, language_of_pair[rows], examples.double())
            usage.index_add_(0, torch.full_like(rows, len(languages)), anchors.double())
            divergences.append(js)
            measured += round_.computed
    divergences = torch.cat(divergences)
    report = RoutingReport({}, {ANCHOR_LANGUAGE: (usage[len(languages)] / len(pairs)).float()}, {})
    for index, language in enumerate(languages):
        members = (language_of_pair == index).nonzero().flatten()
        report.divergence[language] = divergences[members].mean(0)
        report.usage[language] = (usage[index] / len(members)).float()
        report.counts[language] = len(members)
    return report, measured
