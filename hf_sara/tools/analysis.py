"""Routing analysis: how far each language's routing is from its anchors', per layer, with tables and figures."""

from __future__ import annotations

import os
from collections.abc import Mapping

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..compat import load_peft_adapter
from ..files.names import safe_file_name
from ..routing.patching import patch_model
from ..training.paired_data import LANGUAGE_COLUMN, detect_paired_format
from .paired_routing import RoutingReport, encode_pairs, measure_pairs, model_vocab_size
from .reporting import markdown_table, new_figure, write_csv


def analyze_routing(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    batch_size: int = 16,
    max_length: int | None = 512,
) -> RoutingReport:
    """
    Measures, per language and MoE layer, how far the examples' routing is from their anchors' (through
    [`measure_pairs`], as [`RoutingDivergenceCallback`] does during training).

    Args:
        model (`torch.nn.Module`):
            A model patched with [`patch_model`] (a PEFT model to analyse an adapter).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        dataset ([`~datasets.Dataset`]):
            Pairs in any paired format (see [`detect_paired_format`]): `prompt`/`completion` +
            `anchor_prompt`/`anchor_completion`, `text` + `anchor_text`, `messages` + `anchor_messages` (through the
            tokenizer's chat template, see [`encode_pairs`]) or tokenized `input_ids` + `anchor_input_ids`; with a
            `language` column (rows without one count as `"unknown"`). Rows without anchor are skipped.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward.
        max_length (`int` or `None`, *optional*, defaults to `512`):
            Truncation length.

    Returns:
        [`RoutingReport`]
    """
    # The same reading of the paired format as the trainer's: only the format's own anchor columns count, and every
    # example must be there.
    paired_format = detect_paired_format(dataset.column_names)
    pairs = encode_pairs(dataset, paired_format, tokenizer, max_length, model_vocab_size(model))
    report, _ = measure_pairs(model, pairs, batch_size)
    return report


def compare_routing(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    adapter: str | None = None,
    batch_size: int = 16,
    max_length: int | None = 512,
) -> dict[str, RoutingReport]:
    """
    [`analyze_routing`] of a model (`"model"`), or of a base model (`"base"`) and the PEFT adapter `adapter` on it
    (`"adapter"`), on the same pairs.

    Args:
        model (`torch.nn.Module`):
            The model, or the base model of `adapter`; patched here when it is not.
        adapter (`str`, *optional*):
            A PEFT adapter's name or path, loaded onto `model`.
    """
    model = patch_model(model)
    reports = {"base" if adapter else "model": analyze_routing(model, tokenizer, dataset, batch_size, max_length)}
    if adapter:
        adapted = patch_model(load_peft_adapter(model, adapter))
        reports["adapter"] = analyze_routing(adapted, tokenizer, dataset, batch_size, max_length)
    return reports


def divergence_table(reports: Mapping[str, RoutingReport], layers: list[int] | None = None) -> list[dict[str, object]]:
    """One row per language: its pair count and, per model, the mean divergence over `layers` (all by default)."""
    first = next(iter(reports.values()))
    rows = []
    for language in first.divergence:
        row: dict[str, object] = {LANGUAGE_COLUMN: language, "pairs": first.counts[language]}
        for name, report in reports.items():
            row[name] = report.mean_divergence(layers)[language]
        rows.append(row)
    return rows


def plot_layer_divergence(reports: Mapping[str, RoutingReport], path: str, aligned: list[int] | None = None) -> None:
    """Line plot: per model, the JS divergence to the anchors per MoE layer, one line per language."""
    figure = new_figure(figsize=(4.5 * len(reports), 3.6))
    axes = figure.subplots(1, len(reports), sharey=True, squeeze=False)
    for axis, (name, report) in zip(axes[0], reports.items(), strict=True):
        for language, values in report.divergence.items():
            axis.plot(range(len(values)), values.numpy(), marker="o", label=language)
        if aligned:
            axis.axvspan(min(aligned) - 0.5, max(aligned) + 0.5, color="grey", alpha=0.12, label="aligned layers")
        axis.set_title(name)
        axis.set_xlabel("MoE layer")
        axis.set_xticks(range(len(next(iter(report.divergence.values())))))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("JS(routing(example) || routing(anchor)) [nats]")
    axes[0][-1].legend(fontsize="small")
    figure.suptitle("Routing divergence to the anchors, per layer")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_expert_usage(report: RoutingReport, path: str, title: str = "Expert usage") -> None:
    """Heatmaps of the mean routing distribution (MoE layer x expert), one per language and one for the anchors."""
    names = list(report.usage)
    figure = new_figure(figsize=(2.6 * len(names) + 1.2, 3.2), layout="constrained")
    axes = figure.subplots(1, len(names), squeeze=False)
    vmax = max(usage.max().item() for usage in report.usage.values())
    image = None
    for index, (axis, name) in enumerate(zip(axes[0], names, strict=True)):
        usage = report.usage[name]
        image = axis.imshow(usage.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        axis.set_title(name)
        axis.set_xlabel("expert")
        axis.set_xticks(range(0, usage.shape[1], max(1, usage.shape[1] // 8)))
        axis.set_yticks(range(usage.shape[0]))
        if index == 0:
            axis.set_ylabel("MoE layer")
        else:
            axis.set_yticklabels([])
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="mean routing probability")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def write_report(
    reports: Mapping[str, RoutingReport], output_dir: str, aligned: list[int] | None = None
) -> dict[str, str]:
    """
    Writes `routing_divergence.md` and `.csv` (mean over `aligned` layers, all when `None`), `layer_divergence.png`,
    and `expert_usage_<model>.png` for each model into `output_dir`. Returns the paths by kind.
    """
    os.makedirs(output_dir, exist_ok=True)
    rows = divergence_table(reports, aligned)
    paths = {
        "markdown": os.path.join(output_dir, "routing_divergence.md"),
        "csv": os.path.join(output_dir, "routing_divergence.csv"),
        "layers": os.path.join(output_dir, "layer_divergence.png"),
    }
    scope = "all MoE layers" if aligned is None else f"MoE layers {aligned}"
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(f"Mean JS divergence between each language's routing and its anchors' ({scope}):\n\n")
        handle.write(markdown_table(rows) + "\n")
    write_csv(paths["csv"], rows)
    plot_layer_divergence(reports, paths["layers"], aligned)
    for name, report in reports.items():
        key = "usage_" + safe_file_name(name)
        paths[key] = os.path.join(output_dir, f"expert_usage_{key[6:]}.png")
        plot_expert_usage(report, paths[key], title=f"Expert usage: {name}")
    return paths
