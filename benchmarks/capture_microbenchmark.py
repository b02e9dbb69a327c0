"""The routing capture and the alignment loss alone, against the model forward, and the memory they keep for
backward against the `output_router_logits=True` aux-loss path.

    python benchmarks/capture_microbenchmark.py        # writes benchmarks/RESULTS_CAPTURE_CPU.md

Times (median of repeated runs, round-robin in one process, training mode with autograd):
- `forward`: the model forward alone (logits not needed: `logits_to_keep=1`);
- `forward + capture`: the same forward inside `capture_routing` (the hooks pool every layer);
- `loss`: `sara_alignment_loss` forward and backward on the pooled `[batch, layers, experts]` distributions.

Memory kept beyond what the model's own forward keeps for backward, counted exactly (bytes of distinct storages):
- model's own: everything the model's forward saves for its backward (activations and parameters), for scale;
- SARA: what the capture's pooling saves for its backward and the model does not save already, the pooled
  distributions and the batch's two token-index tensors; without activation checkpointing (router logits recomputed
  in backward from the router's input, the default) and with it (the pooling keeps fp32 probabilities per token);
- aux path: the per-layer router logits that `output_router_logits=True` returns, plus what transformers'
  `load_balancing_loss_func` saves for its backward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_sara.routing.capture as capture_module
from hf_sara import capture_routing, patch_model, sara_alignment_loss

CONFIGS = [(1024, 8), (1024, 128), (4096, 8), (4096, 128)]


class SavedBytes:
    """Counts the bytes of distinct tensors that autograd saves while active."""

    def __init__(self):
        self.storages = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def extra_kept_by_capture(model, ids, mask, recompute: bool) -> int:
    """
    Bytes the capture keeps beyond what the model's forward keeps anyway: tensors its pooling saves for backward that
    the model does not save too, the pooled distributions, and the batch's token-index tensors.
    """
    model_saved, pooling_saved = SavedBytes(), SavedBytes()
    original = capture_module._identity
    capture_module._identity = pooling_saved.pack  # the pooling saves under its own hooks
    try:
        with torch.autograd.graph.saved_tensors_hooks(model_saved.pack, lambda tensor: tensor):
            with capture_routing(model, ids.shape, mask, recompute_router_logits=recompute) as capture:
                outputs = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            pooled = capture.distributions()
    finally:
        capture_module._identity = original
    shared = model_saved.storages.keys() | {p.untyped_storage().data_ptr() for p in model.parameters()}
    extra = sum(size for ptr, size in pooling_saved.storages.items() if ptr not in shared)
    segments = capture.segments
    indices = sum(t.nelement() * t.element_size() for t in (segments.token_index, segments.segment_of_token))
    del outputs
    return extra + pooled.nelement() * pooled.element_size() + indices


def model_for(experts: int, seq_len: int, hidden: int, layers: int) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=experts, num_experts_per_tok=2, max_position_embeddings=seq_len + 8,
    )  # fmt: skip
    torch.manual_seed(0)
    return patch_model(Qwen3MoeForCausalLM(config)).train()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run(seq_len: int, experts: int, args) -> dict[str, float]:
    model = model_for(experts, seq_len, args.hidden, args.layers)
    ids = torch.randint(0, 1024, (args.batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def forward():
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def forward_with_capture():
        with capture_routing(model, ids.shape, mask) as capture:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        capture.distributions()

    distributions = torch.softmax(torch.randn(args.batch_size, args.layers, experts), -1)
    anchors = torch.softmax(torch.randn(args.batch_size, args.layers, experts), -1)

    def loss():
        leaf = distributions.clone().requires_grad_()
        sara_alignment_loss(leaf, anchors, layers="all")[0].backward()

    times = {"forward": [], "capture": [], "loss": []}
    functions = (("forward", forward), ("capture", forward_with_capture), ("loss", loss))
    for index in range(args.warmup + args.repeats):
        # Alternate the order: the first run after a free pays the page faults of fresh allocations.
        for name, function in functions if index % 2 == 0 else functions[::-1]:
            elapsed = timed(function)
            if index >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}

    # Memory kept for backward beyond the model's own: with and without activation checkpointing (which turns the
    # recomputation of router logits off), and the aux-loss path.
    sara_bytes = {recompute: extra_kept_by_capture(model, ids, mask, recompute) for recompute in (True, False)}

    # The aux-loss path: the router logits it returns, and what the load-balancing loss saves for backward.
    model_saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(model_saved.pack, lambda tensor: tensor):
        outputs = model(
            input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1, output_router_logits=True
        )
        load_balancing_loss_func(outputs.router_logits, experts, 2, mask)
    for logits in outputs.router_logits:  # kept as outputs (counted once if the loss saves them too)
        model_saved.pack(logits)
    own = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(own.pack, lambda tensor: tensor):
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    aux_bytes = model_saved.total - own.total
    del outputs, plain
    return {
        **medians,
        "sara_bytes": sara_bytes[True],
        "sara_checkpointed_bytes": sara_bytes[False],
        "aux_bytes": aux_bytes,
        "model_bytes": own.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "RESULTS_CAPTURE_CPU.md"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, fp32. Model: "
        f"Qwen3-MoE, hidden {args.hidden}, {args.layers} MoE layers, top-2, batch {args.batch_size}. Times: median "
        f"of {args.repeats} runs after {args.warmup} warm-up runs, round-robin in alternating order.",
        "",
        "Times on a 2-core machine are dominated by allocation page faults (the ratio column swings by tens of "
        "percent between runs): read the step benchmark for end-to-end cost. The memory columns are exact counts.",
        "",
        "| seq | experts | forward ms | forward + capture / forward | loss fwd+bwd ms | model's own MiB | SARA MiB "
        "| SARA / model's own | SARA, probabilities kept MiB | aux path MiB | aux / SARA "
        "| aux / SARA, probabilities kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq_len, experts in CONFIGS:
        result = run(seq_len, experts, args)
        row = [
            str(seq_len), str(experts), f"{result['forward'] * 1e3:.1f}",
            f"{result['capture'] / result['forward']:.3f}", f"{result['loss'] * 1e3:.2f}",
            f"{result['model_bytes'] / 2**20:.1f}", f"{result['sara_bytes'] / 2**20:.3f}",
            f"{result['sara_bytes'] / result['model_bytes']:.2%}", f"{result['sara_checkpointed_bytes'] / 2**20:.3f}",
            f"{result['aux_bytes'] / 2**20:.2f}", f"{result['aux_bytes'] / result['sara_bytes']:.0f}",
            f"{result['aux_bytes'] / result['sara_checkpointed_bytes']:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    command = "python benchmarks/capture_microbenchmark.py " + " ".join(sys.argv[1:])
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(f"<!-- generated by: {command.strip()} -->\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
