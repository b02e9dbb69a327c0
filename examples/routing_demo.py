"""SARA's building blocks in a plain PyTorch loop, offline, in about a minute on a laptop CPU.

A tiny Qwen3-MoE (built from its config, random weights) learns two "languages" that say the same thing: anchor
sentences use tokens 3..63, and each low-resource sentence is its anchor with every token shifted into 64..124. Two
runs from the same start and on the same batches are compared:

- plain SFT: next-token loss on both languages;
- SFT + SARA: the same, plus `weight * JS(routing(low-resource) || routing(anchor))` over the aligned layers, with
  the anchors' routing computed once before training (offline anchors, as published).

It prints the routing divergence between held-out pairs, per MoE layer, before and after each run.

    python examples/routing_demo.py [--steps 60] [--weight 1.5] [--layers all]
"""

from __future__ import annotations

import argparse
import copy

import torch

from hf_sara import capture_routing, js_divergence, patch_model, resolve_layers, routing_distributions
from hf_sara import sara_alignment_loss as alignment_loss
from hf_sara.testing import tiny_model

SHIFT = 61  # anchor token t becomes t + SHIFT in the low-resource language


def parallel_pairs(count: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    anchor = torch.randint(3, 64, (count, length), generator=generator)
    return anchor + SHIFT, anchor


@torch.no_grad()
def pair_divergence(model, low_resource: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean JS between the routing of each low-resource sentence and its anchor, per MoE layer."""
    model.eval()
    divergence = js_divergence(routing_distributions(model, low_resource), routing_distributions(model, anchor))
    return divergence.mean(0)


def train(model, batches, anchor_routing, weight: float, layers) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for (low_resource, anchor), anchors in zip(batches, anchor_routing, strict=True):
        both = torch.cat([low_resource, anchor])  # batch is [low-resource, anchor]
        with capture_routing(model, both.shape) as capture:
            sft_loss = model(input_ids=both, labels=both).loss
        low_resource_routing, _ = capture.distributions().chunk(2, dim=0)
        loss = sft_loss
        if weight > 0:
            sara_loss, _ = alignment_loss(low_resource_routing, anchors, layers=layers)
            loss = loss + weight * sara_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--weight", type=float, default=1.5, help="SARA weight (published: 1.5)")
    parser.add_argument("--layers", default="all", help="aligned MoE layers, e.g. 'all', '1-3', '0.15-0.71'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # The tests' tiny Qwen3-MoE (4 layers, 8 experts, top-2), a little wider, without the load-balancing loss.
    base = patch_model(
        tiny_model("qwen3_moe", args.seed, hidden_size=64, intermediate_size=128, router_aux_loss_coef=0.0)
    )
    generator = torch.Generator().manual_seed(args.seed)
    batches = [parallel_pairs(8, 16, generator) for _ in range(args.steps)]
    held_out = parallel_pairs(64, 16, generator)
    layers = resolve_layers(args.layers, base.config.num_hidden_layers)

    # Offline anchors: the anchors' routing under the model as it is before fine-tuning.
    with torch.no_grad():
        anchor_routing = [routing_distributions(base.eval(), anchor) for _, anchor in batches]

    before = pair_divergence(base, *held_out)
    results = {}
    for name, weight in (("SFT", 0.0), ("SFT + SARA", args.weight)):
        model = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        train(model, batches, anchor_routing, weight, layers)
        results[name] = pair_divergence(model, *held_out)

    print(f"Routing divergence JS(low-resource || anchor) on {held_out[0].shape[0]} held-out pairs, per MoE layer")
    print(f"(aligned layers: {layers}; {args.steps} steps; SARA weight {args.weight})\n")
    print("| layer | before | after SFT | after SFT + SARA |")
    print("|---|---|---|---|")
    for layer in range(base.config.num_hidden_layers):
        row = [before[layer], results["SFT"][layer], results["SFT + SARA"][layer]]
        print(f"| {layer} | " + " | ".join(f"{value:.4f}" for value in row) + " |")
    means = [before[layers].mean(), results["SFT"][layers].mean(), results["SFT + SARA"][layers].mean()]
    print("| aligned mean | " + " | ".join(f"{value:.4f}" for value in means) + " |")


if __name__ == "__main__":
    main()
