"""Routing divergence measured while any transformers `Trainer` trains: a `TrainerCallback`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
from datasets import Dataset
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging
from trl.data_utils import is_conversational

from ..distributed import forget_zero3_trace, rank_batches
from ..routing.capture import eval_mode, routing_distributions
from ..routing.discovery import find_routers, no_router_error
from ..routing.layers import LayerSelection, resolve_layers
from ..routing.loss import js_divergence
from ..routing.patching import get_routing_state, patch_model, unpatch_model
from ..training.paired_data import (
    DEFAULT_ANCHOR_PREFIX,
    MESSAGES_FIELDS,
    PROMPT_COMPLETION_FIELDS,
    TEXT_FIELD,
    TOKENIZED_FIELDS,
    PairedFormat,
    anchored_subset,
    detect_paired_format,
    languages_of,
)
from .analysis import ANCHOR_LANGUAGE, UNKNOWN_LANGUAGE, RoutingReport, plot_layer_divergence

logger = logging.get_logger(__name__)

FIGURE_FILE_NAME = "routing_layer_divergence.png"
METRIC_PREFIX = "routing/js_"


def encode_pairs(
    dataset: Dataset,
    paired_format: PairedFormat,
    prefix: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
) -> list[list[int]]:
    """
    Token ids of one side of a paired dataset, one list per row: the example's (`prefix=""`) or the anchor's.

    Plain text is tokenized as [`analyze_routing`] does it (`prompt + completion`, or the text, with the tokenizer's
    special tokens), so both measure the same sequences; conversational rows (`messages`, or conversational
    `prompt`/`completion`) go through the tokenizer's chat template, the whole conversation at once; tokenized rows
    (`input_ids`) are taken as they are. Everything is truncated to `max_length`.
    """
    truncation = {"truncation": max_length is not None, "max_length": max_length}
    columns = [prefix + name for name in paired_format.fields]
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


def _padded(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, as a tokenizer pads a batch to its longest sequence."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


class RoutingDivergenceCallback(TrainerCallback):
    """
    A [`~transformers.TrainerCallback`] that measures, while a model trains, how far each language's expert routing is
    from its anchors': per language and MoE layer, the mean Jensen-Shannon divergence between the routing of held-out
    examples and that of their anchors, with the model as it is at that moment. Works with any
    [`~transformers.Trainer`] (TRL's `SFTTrainer` and `DPOTrainer`, [`SARATrainer`], ...); the training itself is
    untouched (eval mode and no gradient while measuring, no RNG drawn).

    ```python
    >>> trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=train_dataset)
    >>> trainer.add_callback(RoutingDivergenceCallback(trainer, held_out_pairs, steps=100))
    >>> trainer.train()  # logs routing/js_<language> every 100 steps, writes out/routing_layer_divergence.png
    ```

    It measures at the start of training, at each evaluation (or every `steps` optimizer steps) and at the end, and
    logs through the trainer's own `log` (so `log_history`, TensorBoard, W&B, ... get it), with keys:

    - `routing/js_<language>`: the mean over `layers` (the aligned layers) of the language's per-layer divergence;
    - `routing/js_<language>_layer<i>`: the divergence at MoE layer `i`, for every captured MoE layer.

    On plain-text pairs the values are those of [`analyze_routing`] (`hf-sara analyze`) on the same model and pairs:
    the same sequences, batches and reductions. At the end of training the per-layer figure of the first and the last
    measurement is written to `<output_dir>/routing_layer_divergence.png`. An unpatched model is patched for the
    measurements and unpatched at the end of training (or right after a measurement outside training); a model that
    was already patched (by you or by `SARATrainer`) is left as it is.

    Under DDP, FSDP2 and DeepSpeed the batches of pairs are dealt round-robin over the ranks, the per-pair divergences
    gathered, and every rank logs the same values (only the main process's reporters write them, as for the trainer's
    own loss): the values of one process measuring every pair (tested under DDP and FSDP2 on 2 processes; DeepSpeed
    ZeRO-3 goes through the engine's forward, checked by hand only).

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer to which the callback is attached (with `trainer.add_callback`); its model, tokenizer
            (`processing_class`), accelerator and `log` are used.
        pairs ([`~datasets.Dataset`]):
            Held-out pairs in any paired format the trainer's data accepts (see [`detect_paired_format`]):
            `prompt`/`completion` + `anchor_prompt`/`anchor_completion`, `messages` + `anchor_messages`, `text` +
            `anchor_text` or tokenized `input_ids` + `anchor_input_ids`; with a `language` column (rows without one
            count as `"unknown"`). Rows without an anchor are skipped.
        steps (`int`, *optional*):
            Measure every `steps` optimizer steps. By default, at each evaluation of the trainer.
        layers (`str`, `int`, `Sequence[int]` or `tuple[float, float]`, *optional*):
            The MoE layers `routing/js_<language>` averages over, in any form [`resolve_layers`] accepts. Defaults
            to the trainer's `sara_layers` when its arguments are a [`SARAConfig`], else to the published band (as
            `hf-sara analyze`).
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward (as `hf-sara analyze`).
        max_length (`int` or `None`, *optional*, defaults to `512`):
            Truncation length (as `hf-sara analyze`).
        anchor_prefix (`str`, *optional*):
            The prefix of the anchor columns. Defaults to the trainer's `anchor_prefix`, or `"anchor_"`.
        measure_at_start (`bool`, *optional*, defaults to `True`):
            Also measure before the first training step (the baseline the figure compares with).
        plot (`bool`, *optional*, defaults to `True`):
            Write the per-layer figure at the end of training (needs matplotlib).

    Attributes:
        layers (`list[int]`):
            The MoE layers `routing/js_<language>` averages over.
        reports (`dict[int, RoutingReport]`):
            Every measurement, by the optimizer step it was made at.
        rows_measured (`int`):
            How many pairs this process measured in the last measurement (all of them on one process).
    """

    def __init__(
        self,
        trainer: Trainer,
        pairs: Dataset,
        steps: int | None = None,
        layers: LayerSelection = None,
        batch_size: int = 16,
        max_length: int | None = 512,
        anchor_prefix: str | None = None,
        measure_at_start: bool = True,
        plot: bool = True,
    ):
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(
                f"`steps` is how often to measure, in optimizer steps: an int >= 1 or None, not {steps!r}."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, not {batch_size}.")
        if plot and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "The routing figure needs matplotlib: `pip install 'hf_sara[analysis]'`, or pass `plot=False`."
            )
        self.trainer = trainer
        self.steps = steps
        self.batch_size = batch_size
        self.measure_at_start = measure_at_start
        self.plot = plot
        self.reports: dict[int, RoutingReport] = {}
        self.rows_measured = 0

        args = trainer.args
        prefix = anchor_prefix or getattr(args, "anchor_prefix", None) or DEFAULT_ANCHOR_PREFIX
        text_field = getattr(args, "dataset_text_field", TEXT_FIELD)
        paired_format = detect_paired_format(pairs.column_names, prefix, text_field)
        pairs = anchored_subset(pairs, paired_format)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        if tokenizer is None:
            raise ValueError("The trainer has no `processing_class` (tokenizer) to tokenize the pairs with.")
        self._examples = encode_pairs(pairs, paired_format, "", tokenizer, max_length)
        self._anchors = encode_pairs(pairs, paired_format, prefix, tokenizer, max_length)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_token_id = pad_token_id if pad_token_id is not None else 0
        languages = languages_of(pairs, missing=UNKNOWN_LANGUAGE)
        self._languages = list(dict.fromkeys(languages))
        self._language_of_row = torch.tensor([self._languages.index(language) for language in languages])

        # The layers, checked now rather than at the first measurement.
        state = get_routing_state(trainer.model)
        if state is not None:
            num_moe_layers, captured = len(state.sites), state.captured_layers
        else:
            num_moe_layers = len(find_routers(trainer.model))
            if num_moe_layers == 0:
                raise no_router_error(trainer.model)
            captured = list(range(num_moe_layers))
        self.layers = resolve_layers(
            layers if layers is not None else getattr(args, "sara_layers", None), num_moe_layers
        )
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise ValueError(
                f"The model was patched capturing MoE layers {captured}, which leaves out the layers {missing} to "
                "average over: patch it with `patch_model(model)` (every layer), or pass `layers` among the captured "
                "ones."
            )
        self._positions = [captured.index(layer) for layer in self.layers]  # along dim 1 of the distributions
        self._captured = captured
        self._patched_here = False
        self._training = False
        self._last_step: int | None = None
        if steps is None and getattr(args, "eval_strategy", "no") == "no":
            logger.warning(
                "RoutingDivergenceCallback measures at each evaluation, and this trainer does not evaluate "
                "(`eval_strategy='no'`): it will measure at the start and the end of training only. Pass `steps=N` "
                "to measure every N steps."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Measuring
    # ----------------------------------------------------------------------------------------------------------------

    def _model(self) -> nn.Module:
        """The model to run: DeepSpeed's engine (whose forward gathers ZeRO-3 shards), else the trainer's model."""
        trainer = self.trainer
        return trainer.model_wrapped if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        """Patches the model if nobody did; unpatches it afterwards unless a training run is in progress."""
        model = self.trainer.model
        if get_routing_state(model) is None:
            patch_model(model)
            self._patched_here = True
        try:
            yield
        finally:
            if self._patched_here and not self._training:
                self._unpatch()

    def _unpatch(self) -> None:
        if self._patched_here:
            unpatch_model(self.trainer.model)
            self._patched_here = False

    def _routing(self, model: nn.Module, sequences: list[list[int]], device: torch.device) -> torch.Tensor:
        input_ids, attention_mask = _padded(sequences, self._pad_token_id, device)
        return routing_distributions(model, input_ids, attention_mask, logits_to_keep=1).cpu()

    @torch.no_grad()
    def measure(self) -> RoutingReport:
        """
        Measures the routing divergence of the pairs with the model as it is now, split over the trainer's processes
        (every process must call it), and returns it; logs nothing.

        Returns:
            [`RoutingReport`]: per language, the divergence per captured MoE layer, the mean routing and the pair
            count, as [`analyze_routing`] returns them.
        """
        accelerator = self.trainer.accelerator
        model = self._model()
        num_rows = len(self._examples)
        num_batches = -(-num_rows // self.batch_size)
        num_languages = len(self._languages)
        mine = rank_batches(num_batches, accelerator.num_processes, accelerator.process_index)
        divergences, row_ids = [], []
        usage = None  # per language, then the anchors: summed routing of this process's rows
        with self._patched(), eval_mode(model):
            device = next(model.parameters()).device
            for batch in mine:
                # A process left without a batch runs one anyway and drops it: sharded engines gather in every forward.
                start = (batch if batch is not None else 0) * self.batch_size
                rows = list(range(start, min(start + self.batch_size, num_rows)))
                examples = self._routing(model, [self._examples[row] for row in rows], device)
                anchors = self._routing(model, [self._anchors[row] for row in rows], device)
                padded = torch.zeros(self.batch_size, examples.shape[1])
                padded[: len(rows)] = js_divergence(examples, anchors)  # [rows, layers]
                ids = torch.full((self.batch_size,), -1, dtype=torch.long)
                if usage is None:
                    usage = torch.zeros(num_languages + 1, *examples.shape[1:])
                if batch is not None:
                    ids[: len(rows)] = torch.tensor(rows)
                    usage.index_add_(0, self._language_of_row[rows], examples)
                    usage[num_languages] += anchors.sum(0)
                divergences.append(padded)
                row_ids.append(ids)
            forget_zero3_trace(self.trainer.model_wrapped)
        self.rows_measured = sum(len(ids[ids >= 0]) for ids in row_ids)
        gather_device = accelerator.device
        divergences = accelerator.gather(torch.cat(divergences).to(gather_device)).cpu()
        row_ids = accelerator.gather(torch.cat(row_ids).to(gather_device)).cpu()
        usage = accelerator.gather(usage[None].to(gather_device)).cpu().sum(0)
        # Back in the rows' order, so the means below reduce the same values in the same order as one process does.
        present = row_ids >= 0
        divergences = divergences[present][row_ids[present].argsort()]
        if divergences.shape[0] != num_rows:
            raise RuntimeError(f"Gathered {divergences.shape[0]} measured pairs of {num_rows}.")
        report = RoutingReport({}, {}, {})
        for index, language in enumerate(self._languages):
            members = (self._language_of_row == index).nonzero().flatten()
            report.divergence[language] = divergences[members].mean(0)
            report.usage[language] = usage[index] / len(members)
            report.counts[language] = len(members)
        report.usage[ANCHOR_LANGUAGE] = usage[num_languages] / num_rows
        return report

    def metrics(self, report: RoutingReport) -> dict[str, float]:
        """The logged values of a report: `routing/js_<language>` and `routing/js_<language>_layer<i>`."""
        metrics = {
            f"{METRIC_PREFIX}{language}": value for language, value in report.mean_divergence(self._positions).items()
        }
        for language, values in report.divergence.items():
            for layer, value in zip(self._captured, values.tolist(), strict=True):
                metrics[f"{METRIC_PREFIX}{language}_layer{layer}"] = value
        return metrics

    def _measure_and_log(self, state: TrainerState) -> None:
        if self._last_step == state.global_step:  # several eval datasets evaluate one after the other
            return
        model = self._model()
        # Logged in eval mode, like an evaluation: TRL's trainers flush their accumulated metrics of the model's mode
        # into each `log`, and their training metrics belong to the next training log, not to this one.
        with eval_mode(model):
            report = self.measure()
            should_log = self.trainer.control.should_log
            self.trainer.log(self.metrics(report))
            # `log` ends with `on_log`, which clears `should_log`: the trainer must still log this step itself.
            self.trainer.control.should_log = should_log
        self.reports[state.global_step] = report
        self._last_step = state.global_step

    def write_figure(self, path: str) -> None:
        """Writes the per-layer divergence of the first and the last measurement to `path` (a PNG)."""
        steps = sorted(self.reports)
        shown = {f"step {step}": self.reports[step] for step in dict.fromkeys([steps[0], steps[-1]])}
        plot_layer_divergence(shown, path, [self._captured.index(layer) for layer in self.layers])

    # ----------------------------------------------------------------------------------------------------------------
    # Events
    # ----------------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._training = True
        self._last_step = None
        if self.measure_at_start:
            self._measure_and_log(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.steps is not None and state.global_step % self.steps == 0:
            self._measure_and_log(state)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.steps is None:
            self._measure_and_log(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        try:
            self._measure_and_log(state)
            if self.plot and state.is_world_process_zero:
                os.makedirs(args.output_dir, exist_ok=True)
                self.write_figure(os.path.join(args.output_dir, FIGURE_FILE_NAME))
        finally:
            self._training = False
            self._unpatch()
