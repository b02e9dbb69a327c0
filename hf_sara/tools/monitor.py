"""Routing divergence measured while any transformers `Trainer` trains: a `TrainerCallback`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging

from ..distributed import forget_zero3_trace
from ..routing.capture import eval_mode
from ..routing.discovery import find_routers, no_router_error
from ..routing.layers import LayerSelection, resolve_layers
from ..routing.patching import get_routing_state, patch_model, unpatch_model
from ..training.paired_data import DEFAULT_ANCHOR_PREFIX, TEXT_FIELD, detect_paired_format
from .analysis import plot_layer_divergence
from .paired_routing import RoutingReport, encode_pairs, measure_pairs, model_vocab_size

logger = logging.get_logger(__name__)

FIGURE_FILE_NAME = "routing_layer_divergence.png"
METRIC_PREFIX = "routing/js_"


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
    - `routing/js_<language>_layer<i>`: the divergence at MoE layer `i`, for every measured MoE layer: up to the last
      aligned one (its forwards end there), or every layer with `every_layer=True`.

    The values are those of [`analyze_routing`] (`hf-sara analyze`) on the same model, pairs and `batch_size`, in any
    paired format: both measure through [`measure_pairs`] (the same sequences, batches and reductions). At the end of
    training the per-layer figure of the first and the last measurement is written to
    `<output_dir>/routing_layer_divergence.png` (a figure that cannot be written is a warning, not an error). An
    unpatched model is patched for each measurement and unpatched right after it, so that nothing is left on the model
    even when the training stops with an exception; a model that was already patched (by you or by `SARATrainer`) is
    left as it is.

    Under DDP, FSDP2 and DeepSpeed the batches of pairs are dealt round-robin over the ranks ([`deal_batches`]), each
    round's per-pair measurements gathered, and every rank logs the same values (only the main process's reporters
    write them, as for the trainer's own loss): the values of one process measuring every pair (tested under DDP and
    FSDP2 on 2 processes; DeepSpeed ZeRO-3 goes through the engine's forward, checked by hand only).

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
        every_layer (`bool`, *optional*, defaults to `False`):
            Measure every MoE layer, not only those up to the last of `layers` (whose forwards then run to the end of
            the model: about a third more work at the published band of 48 layers).

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
        every_layer: bool = False,
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
        if isinstance(pairs, DatasetDict):
            raise ValueError(
                f"`pairs` is a DatasetDict (splits {list(pairs)}): pass one split of held-out pairs, e.g. "
                f"`pairs[{next(iter(pairs), 'test')!r}]`."
            )
        paired_format = detect_paired_format(pairs.column_names, prefix, text_field)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        if tokenizer is None:
            raise ValueError("The trainer has no `processing_class` (tokenizer) to tokenize the pairs with.")
        self._pairs = encode_pairs(pairs, paired_format, tokenizer, max_length, model_vocab_size(trainer.model))

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
        self._last_position = len(captured) - 1 if every_layer else max(self._positions)
        self._patched_here = False
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
        """
        Patches the model if nobody did, for one measurement, and unpatches it right after: a training stopped by an
        exception (which no callback event reports) leaves nothing on the model.
        """
        model = self.trainer.model
        if get_routing_state(model) is None:
            patch_model(model)
            self._patched_here = True
        try:
            yield
        finally:
            self._unpatch()

    def _unpatch(self) -> None:
        if self._patched_here:
            unpatch_model(self.trainer.model)
            self._patched_here = False

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        accelerator = self.trainer.accelerator
        return accelerator.gather(tensor.to(accelerator.device)).cpu()

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
        with self._patched():
            report, self.rows_measured = measure_pairs(
                self._model(),
                self._pairs,
                self.batch_size,
                accelerator.process_index,
                accelerator.num_processes,
                self._gather,
                last_layer=self._last_position,
            )
            forget_zero3_trace(self.trainer.model_wrapped)
        return report

    def metrics(self, report: RoutingReport) -> dict[str, float]:
        """The logged values of a report: `routing/js_<language>` and `routing/js_<language>_layer<i>`."""
        metrics = {
            f"{METRIC_PREFIX}{language}": value for language, value in report.mean_divergence(self._positions).items()
        }
        for language, values in report.divergence.items():
            for layer, value in zip(self._captured[: len(values)], values.tolist(), strict=True):
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
        self._measure_and_log(state)
        if self.plot and state.is_world_process_zero:
            path = os.path.join(args.output_dir, FIGURE_FILE_NAME)
            try:
                os.makedirs(args.output_dir, exist_ok=True)
                self.write_figure(path)
            except OSError as error:  # the training is done: a figure that cannot be written must not cost it
                logger.warning(
                    f"RoutingDivergenceCallback could not write its figure {path} ({error}); the training and the "
                    "logged routing values are unaffected. Free that path (or pass `plot=False`) to get the figure."
                )
