"""Memory that SARA keeps for backward under each gradient-checkpointing mode, counted exactly.

    python benchmarks/checkpointing_memory.py        # writes benchmarks/RESULTS_CHECKPOINTING_CPU.md

For each mode, the route `SARATrainer` takes: no checkpointing, the graph route (the pooling's backward recomputes the
router logits from the router's input); non-reentrant and reentrant checkpointing, the deferred route (the routing is
pooled without autograd in the forward; the alignment gradient is added where the backward recomputes each router).
Counted, beyond what the same model's forward keeps for backward in the same mode without SARA: the bytes of the
distinct storages autograd saves during the forward (a saved-tensors hook around the whole forward: what a
checkpoint drops and recomputes is not counted, since it is not kept), plus what the capture itself holds until the
backward (the pooled `[sequences, layers, experts]` distributions, the anchors' targets and row weights the term
binds, the batch's two token-index tensors). For contrast, the graph route under checkpointing as it was before the
deferred route ("probabilities kept": the pooling's fp32 probabilities of every token and layer, which the checkpoint
cannot drop). Tiny Qwen3-MoE, hidden 256, 4 MoE layers, top-2, batch 2, fp32, CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf_sara.routing.capture as capture_module  # noqa: E402
from hf_sara import capture_routing, patch_model  # noqa: E402

CONFIGS = [(1024, 8), (1024, 128), (4096, 8), (4096, 128)]
MODES = {"none": None, "non-reentrant": False, "reentrant": True}


def saved_bytes(model, ids, mask, gradient: str | None) -> tuple[int, int]:
    """(bytes of the distinct storages saved for backward in the forward, bytes the capture holds)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    # The graph route's pooling saves under hooks of its own (outside a checkpoint's): counted through them too.
    original, capture_module._identity = capture_module._identity, pack
    try:
        return _forward_and_count(model, ids, mask, gradient, pack, storages)
    finally:
        capture_module._identity = original


def _forward_and_count(model, ids, mask, gradient, pack, storages) -> tuple[int, int]:
    held = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if gradient is None:
            model(input_ids=ids, attention_mask=mask, use_cache=False, labels=ids)
        else:
            with capture_routing(model, ids.shape, mask, gradient=gradient) as capture:
                output = model(input_ids=ids, attention_mask=mask, use_cache=False, labels=ids)
            distributions = capture.distributions()
            layers = list(range(distributions.shape[1]))
            has_anchor = torch.ones(distributions.shape[0], dtype=torch.bool)
            weights = has_anchor.float() / len(has_anchor) / len(layers)
            anchors = torch.softmax(torch.randn(distributions.shape), -1)
            capture.alignment_term(anchors, has_anchor, weights, layers, ordering=output.loss)
            segments = capture.segments
            held = sum(t.nelement() * t.element_size() for t in (segments.token_index, segments.segment_of_token))
            held += distributions.nelement() * distributions.element_size()
            deferred = capture.deferred
            if deferred is not None:  # the term's targets and row weights, held until the backward
                held += deferred.targets.nelement() * 4 + deferred.row_weights.nelement() * 4
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in parameters), held


def model_for(experts: int, seq_len: int, checkpointing: bool | None) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=seq_len + 8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    return patch_model(model)


def measure() -> list[list[str]]:
    rows = []
    for seq_len, experts in CONFIGS:
        ids = torch.randint(0, 1024, (2, seq_len), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        row = [str(seq_len), str(experts)]
        for mode, checkpointing in MODES.items():
            model = model_for(experts, seq_len, checkpointing)
            own, _ = saved_bytes(model, ids, mask, None)
            gradient = "graph" if checkpointing is None else "deferred"
            with_sara, held = saved_bytes(model, ids, mask, gradient)
            row += [f"{own / 2**20:.1f}", f"{(with_sara - own + held) / 2**20:.3f}"]
            if mode == "non-reentrant":
                with_graph, held_graph = saved_bytes(model, ids, mask, "graph")
                probabilities_kept = (with_graph - own + held_graph) / 2**20
        row.append(f"{probabilities_kept:.3f}")
        rows.append(row)
        print(" | ".join(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "RESULTS_CHECKPOINTING_CPU.md"))
    options = parser.parse_args()
    rows = measure()
    lines = [
        "# Memory SARA keeps for backward, per gradient-checkpointing mode (CPU, exact counts)",
        "",
        "Command: `python benchmarks/checkpointing_memory.py`",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, fp32. Tiny Qwen3-MoE, hidden 256, 4 MoE layers, "
        'top-2, batch 2. "model": what the model\'s forward keeps for backward in that mode (parameters excluded); '
        '"SARA": what SARA keeps beyond it (saved tensors and what the capture holds until the backward). Last '
        "column: the graph route under non-reentrant checkpointing, which keeps the fp32 probabilities.",
        "",
        "| seq (x batch 2) | experts | no ckpt: model MiB | no ckpt: SARA MiB | non-reentrant: model MiB "
        "| non-reentrant: SARA MiB | reentrant: model MiB | reentrant: SARA MiB | non-reentrant, probabilities kept: "
        "SARA MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    with open(options.output, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    print(f"written: {options.output}")


if __name__ == "__main__":
    main()
