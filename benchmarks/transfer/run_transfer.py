"""Controlled transfer experiment: does SARA carry knowledge seen only in the anchor language over to other languages?

    python benchmarks/transfer/run_transfer.py --write BENCHMARKS.md    # 10 seeds, about 8 minutes on 2 CPU cores
    python benchmarks/transfer/run_transfer.py --base-routing both --write BENCHMARKS.md   # both base-routing arms
    python benchmarks/transfer/run_transfer.py --seeds 0 --quick        # a smoke run, prints only

For each seed, on the synthetic world of `synthetic_languages.py` (new facts and a new split of the entities per seed):

1. a tiny Qwen3-MoE (4 layers, 8 experts, top-2) is pre-trained from scratch on the pre-training corpus: statements
   in all three languages about the shared entities, in English only about the anchor-only entities, English
   questions and answers about every entity, and the `xa`/`xb` lexicons;
2. from that base, two full fine-tunings with the same seed, data order and budget on questions and answers in `xa`
   and `xb` about the shared entities: TRL's plain `SFTTrainer`, and `SARATrainer` with the English versions as
   anchors (published weight 1.5, default layer band, offline anchors);
3. each model answers the held-out questions about the anchor-only entities in `xa`, `xb` (and `en`, the ceiling):
   multiple choice among the six values of the asked relation in that language, by the model's next-token
   probability (chance: 1/6); the fine-tuning questions are scored the same way ("seen"); and the routing divergence
   between each held-out question and its English version is measured per MoE layer.

Two ways to make the base model (`--base-routing`):

- `shared` (the default): plain pre-training, step 1 as above. The languages end up routed to much the same experts
  (JS to English 0.04-0.09 per layer).
- `separated`: the same pre-training (corpus, steps, learning rate, seed) plus an auxiliary routing term that pulls
  every token's router distribution, in every MoE layer, into a block of experts of its language (`EXPERT_BLOCKS`:
  `en` 0-3, `xa` 4-5, `xb` 6-7; the three vocabularies are disjoint except for entity names and punctuation, which
  take their sentence's language). The term is dropped after pre-training: the base is a plain Qwen3-MoE checkpoint
  whose routers separate the languages on their own (the situation SARA targets), and steps 2-3 are unchanged.

`both` runs the two arms for each seed and reports them side by side, with the base model's routing divergence (what
`hf-sara analyze` measures) beside the accuracy difference. The report gives mean and standard deviation over the
seeds, whatever the outcome.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores other jobs share, spinning made a run up to
# 7x slower (measured on 2 cores); the results are the same to the last digit. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_languages import LANGUAGES, LOW_RESOURCE, World  # noqa: E402

BEGIN, END = "<!-- transfer:begin -->", "<!-- transfer:end -->"  # the shared arm's section
ARMS = ("base", "SFT", "SARA")
COLUMNS = (*LOW_RESOURCE, "en")
BASE_ROUTINGS = ("shared", "separated")
SECTIONS = {"shared": "transfer", "separated": "transfer-separated", "both": "transfer-arms"}
# Separated arm: each language's block of the 8 experts during pre-training (English has the most text).
EXPERT_BLOCKS = {"en": (0, 1, 2, 3), "xa": (4, 5), "xb": (6, 7)}
SEPARATION_WEIGHT = 1.0


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer (split on spaces) over the words of `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="right"
    )


def training_arguments(output_dir: str, steps: int, learning_rate: float, seed: int, batch_size: int) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 5),
        save_strategy="no", report_to="none", seed=seed, bf16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, max_length=32, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip


@torch.no_grad()
def choice_accuracy(model, tokenizer, world: World, entities: list[str], language: str) -> float:
    """Share of questions whose most probable next word, among the relation's values, is the right one."""
    facts = world.facts_of(entities)
    prompts = [world.question(fact, language) for fact in facts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    logits = model(**batch).logits.float()
    last = batch["attention_mask"].sum(-1) - 1
    next_word = logits[torch.arange(len(facts)), last]
    correct = 0
    for row, fact in enumerate(facts):
        candidates = tokenizer.convert_tokens_to_ids(world.candidates(fact, language))
        chosen = candidates[int(next_word[row, candidates].argmax())]
        correct += chosen == tokenizer.convert_tokens_to_ids(world.words[language][fact.value])
    return correct / len(facts)


def _language_of_token(tokenizer, world: World) -> torch.Tensor:
    """Per token id: the index in `LANGUAGES` of the one language whose vocabulary holds it, -1 for shared tokens."""
    table = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for index, language in enumerate(LANGUAGES):
        ids = tokenizer.convert_tokens_to_ids(sorted(set(world.words[language].values())))
        assert tokenizer.unk_token_id not in ids and (table[ids] == -1).all(), "vocabularies must be disjoint"
        table[ids] = index
    return table


def expert_targets(
    input_ids: torch.Tensor, language_of_token: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Per token of `input_ids` (`[batch, seq]`), the language whose experts it is pulled to in a separated
    pre-training, -1 for none: a word of one language's vocabulary gets that language; a shared token (entity name,
    punctuation) gets its sequence's language when the sequence holds words of one language only, none in a
    bilingual lexicon line (`red = toru`); padding gets none.
    """
    targets = language_of_token.to(input_ids.device)[input_ids]
    known = targets >= 0
    lowest = torch.where(known, targets, len(LANGUAGES)).min(-1, keepdim=True).values
    highest = torch.where(known, targets, -1).max(-1, keepdim=True).values
    targets = torch.where(~known & (lowest == highest), lowest, targets)  # one-language rows fill their shared tokens
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, -1)
    return targets


def separated_routing_trainer(*args, language_of_token: torch.Tensor, **kwargs):
    """
    The pre-training trainer of the separated arm: TRL's `SFTTrainer` plus an auxiliary routing term that pulls each
    token's router distribution, in every MoE layer, into its language's block of experts (`EXPERT_BLOCKS`, targets
    from `expert_targets`): `-log(router probability mass on the block)`, averaged over the layers and the targeted
    tokens, weight `SEPARATION_WEIGHT`. It acts through the router weights only (nothing is added to the model), so
    once `remove_separation_hooks` has run the model is an ordinary Qwen3-MoE that routes by language on its own.
    """
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    from trl import SFTTrainer

    captured: list[torch.Tensor] = []

    class SeparatedRoutingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            captured.clear()
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = result if return_outputs else (result, None)
            targets = expert_targets(inputs["input_ids"], language_of_token, inputs.get("attention_mask"))
            targets = targets.reshape(-1)
            if len(captured) != len(routers) or any(len(logits) != len(targets) for logits in captured):
                raise RuntimeError(f"captured {len(captured)} router outputs for {len(routers)} routers")
            kept = targets >= 0
            if kept.any():
                masks = blocks.to(targets.device)[targets[kept]]  # [tokens, experts]: the target block
                terms = [
                    -torch.log_softmax(logits[kept].float(), dim=-1).masked_fill(~masks, float("-inf")).logsumexp(-1)
                    for logits in captured
                ]
                loss = loss + SEPARATION_WEIGHT * torch.stack(terms).mean()
            captured.clear()
            return (loss, outputs) if return_outputs else loss

    trainer = SeparatedRoutingTrainer(*args, **kwargs)
    routers = [module for module in trainer.model.modules() if isinstance(module, Qwen3MoeTopKRouter)]
    blocks = torch.zeros(len(LANGUAGES), routers[0].num_experts, dtype=torch.bool)
    for index, language in enumerate(LANGUAGES):
        blocks[index, list(EXPERT_BLOCKS[language])] = True
    hooks = [
        router.register_forward_hook(lambda module, args, output: captured.append(output[0])) for router in routers
    ]
    trainer.remove_separation_hooks = lambda: [hook.remove() for hook in hooks]
    return trainer


def run_seed(
    seed: int,
    pretrain_steps: int,
    finetune_steps: int,
    sara_weight: float,
    work_dir: str,
    base_routing: str = "shared",
) -> dict:
    from datasets import Dataset
    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging
    from trl import SFTConfig, SFTTrainer

    from hf_sara import SARAConfig, SARATrainer, patch_model
    from hf_sara.testing import tiny_qwen3_moe
    from hf_sara.tools.analysis import analyze_routing

    logging.set_verbosity_error()
    world = World(seed)
    tokenizer = word_tokenizer(world.pretraining_texts() + [row["prompt"] for row in world.qa_pairs(world.facts)])
    held_out = Dataset.from_list(world.qa_pairs(world.anchor_only_entities))
    finetune = Dataset.from_list(world.qa_pairs(world.shared_entities))

    start = time.perf_counter()
    base = tiny_qwen3_moe(tokenizer, seed)  # the demo's tiny Qwen3-MoE: 4 layers, 8 experts, top-2
    pretrainer_class, extra = SFTTrainer, {}
    if base_routing == "separated":
        pretrainer_class, extra = (
            separated_routing_trainer,
            {"language_of_token": _language_of_token(tokenizer, world)},
        )
    pretrainer = pretrainer_class(
        model=base,
        args=SFTConfig(
            **training_arguments(
                os.path.join(work_dir, f"pretrain-{base_routing}-{seed}"), pretrain_steps, 3e-3, seed, 32
            )
        ),
        train_dataset=Dataset.from_dict({"text": world.pretraining_texts()}).shuffle(seed=seed),
        processing_class=tokenizer,
        **extra,
    )
    pretrainer.train()
    if base_routing == "separated":
        pretrainer.remove_separation_hooks()  # the base is a plain Qwen3-MoE from here on
    base_dir = os.path.join(work_dir, f"base-{base_routing}-{seed}")
    base.save_pretrained(base_dir)

    models = {"base": base}
    for arm, trainer_class, config_class, extra in (
        ("SFT", SFTTrainer, SFTConfig, {}),
        ("SARA", SARATrainer, SARAConfig, {"sara_weight": sara_weight}),
    ):
        model = patch_model(Qwen3MoeForCausalLM.from_pretrained(base_dir))
        arguments = training_arguments(
            os.path.join(work_dir, f"{arm}-{base_routing}-{seed}"), finetune_steps, 1e-3, seed, 16
        )
        trainer_class(
            model=model, args=config_class(**arguments, **extra), train_dataset=finetune, processing_class=tokenizer
        ).train()
        models[arm] = model

    result = {"accuracy": {}, "seen": {}, "divergence": {}, "seconds": 0.0}
    for arm, model in models.items():
        model.eval()
        result["accuracy"][arm] = {
            language: choice_accuracy(model, tokenizer, world, world.anchor_only_entities, language)
            for language in LANGUAGES
        }
        result["seen"][arm] = {
            language: choice_accuracy(model, tokenizer, world, world.shared_entities, language)
            for language in LOW_RESOURCE
        }
        report = analyze_routing(patch_model(model), tokenizer, held_out)
        result["divergence"][arm] = {language: report.divergence[language].tolist() for language in LOW_RESOURCE}
    result["seconds"] = time.perf_counter() - start
    return result


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _command_line(command: str, seeds: list[int], seconds: float) -> str:
    return (
        f"Command: `{command}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; {seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__})."
    )


def _separation_note() -> str:
    blocks = ", ".join(f"`{language}` experts {min(b)}-{max(b)}" for language, b in EXPERT_BLOCKS.items())
    return (
        f"Base routing separated: pre-training adds, in every MoE layer, -log(router probability mass on the token's "
        f"language's experts) ({blocks}; weight {SEPARATION_WEIGHT}; entity names and punctuation take their "
        f"sentence's language, none in lexicon lines); the term is dropped after pre-training, the base is a plain "
        f"Qwen3-MoE and both fine-tunings are exactly as in the shared arm."
    )


def format_report(
    results: dict[int, dict], command: str, arguments: argparse.Namespace, seconds: float, note: str = ""
) -> str:
    return _command_line(command, list(results), seconds) + "\n\n" + _details(results, arguments, note)


def _details(results: dict[int, dict], arguments: argparse.Namespace, note: str = "") -> str:
    seeds = list(results)
    lines = [
        f"Pre-training {arguments.pretrain_steps} steps, fine-tuning {arguments.finetune_steps} steps (both arms, "
        f"same seed and data order), SARA weight {arguments.sara_weight}. Mean ± standard deviation over the seeds.",
        "",
        *([note, ""] if note else []),
        "Held-out accuracy: questions about the anchor-only entities (their facts were only ever seen in `en`), "
        "multiple choice among 6 values (chance 0.167). `seen`: the fine-tuning questions, in `xa`/`xb`.",
        "",
        "| model | xa | xb | en (ceiling) | seen xa | seen xb |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        cells = [_mean_std([results[s]["accuracy"][arm][language] for s in seeds]) for language in COLUMNS]
        cells += [_mean_std([results[s]["seen"][arm][language] for s in seeds]) for language in LOW_RESOURCE]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    differences = {
        language: [results[s]["accuracy"]["SARA"][language] - results[s]["accuracy"]["SFT"][language] for s in seeds]
        for language in COLUMNS
    }
    cells = [_mean_std(differences[language]) for language in COLUMNS]
    lines.append("| SARA - SFT | " + " | ".join(cells) + " | | |")
    wins = ", ".join(
        f"{language} {sum(d > 0 for d in differences[language])}/{sum(d < 0 for d in differences[language])}"
        for language in COLUMNS
    )
    lines += ["", f"Seeds where SARA is above / below SFT on held-out accuracy: {wins}."]
    layers = len(results[seeds[0]]["divergence"]["base"][LOW_RESOURCE[0]])
    lines += [
        "",
        "Routing divergence JS(held-out question || its English version) per MoE layer (the aligned band is "
        "layers 1-3 at this depth):",
        "",
        "| model | language | " + " | ".join(f"layer {layer}" for layer in range(layers)) + " |",
        "|---|---|" + "---|" * layers,
    ]
    for arm in ARMS:
        for language in LOW_RESOURCE:
            cells = [
                _mean_std([results[s]["divergence"][arm][language][layer] for s in seeds]) for layer in range(layers)
            ]
            lines.append(f"| {arm} | {language} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, held-out accuracy `xa`/`xb` (SFT -> SARA):", ""]
    for seed in seeds:
        accuracy = results[seed]["accuracy"]
        lines.append(
            f"- seed {seed}: "
            + ", ".join(
                f"{language} {accuracy['SFT'][language]:.3f} -> {accuracy['SARA'][language]:.3f}"
                for language in LOW_RESOURCE
            )
        )
    return "\n".join(lines)


def base_js(result: dict, language: str) -> float:
    """The base model's JS to English over the aligned band, as `hf-sara analyze`'s summary table averages it."""
    from hf_sara.routing.layers import resolve_layers

    per_layer = result["divergence"]["base"][language]
    band = resolve_layers(None, len(per_layer))
    return statistics.mean(per_layer[layer] for layer in band)


def format_comparison(
    results: dict[str, dict[int, dict]], command: str, arguments: argparse.Namespace, seconds: float
) -> str:
    """The two base-routing arms side by side, then the separated arm's full report."""
    from hf_sara.routing.layers import resolve_layers

    seeds = list(results["shared"])
    layers = len(results["shared"][seeds[0]]["divergence"]["base"][LOW_RESOURCE[0]])
    band = resolve_layers(None, layers)
    lines = [
        _command_line(command, seeds, seconds),
        "",
        f"Both arms from the same worlds, seeds, pre-training budget ({arguments.pretrain_steps} steps) and "
        f"fine-tuning budget ({arguments.finetune_steps} steps, SARA weight {arguments.sara_weight}); they differ "
        "only in how the base model was made to route (the shared arm is the section above). Base JS: the base "
        "model's JS(held-out question || its English version), mean over MoE layers "
        f"{band[0]}-{band[-1]} (the default aligned band, what `hf-sara analyze` summarises; the maximum is "
        "ln 2 = 0.693). Accuracy: held-out questions about the anchor-only entities (chance 0.167). Mean ± standard "
        "deviation over the seeds.",
        "",
        "| base routing | language | base JS | SFT | SARA | SARA - SFT | seeds SARA above / below SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for routing in BASE_ROUTINGS:
        arm = results[routing]
        for language in LOW_RESOURCE:
            sft = [arm[s]["accuracy"]["SFT"][language] for s in seeds]
            sara = [arm[s]["accuracy"]["SARA"][language] for s in seeds]
            difference = [b - a for a, b in zip(sft, sara, strict=True)]
            cells = [
                _mean_std([base_js(arm[s], language) for s in seeds]),
                _mean_std(sft),
                _mean_std(sara),
                _mean_std(difference),
                f"{sum(d > 0 for d in difference)}/{sum(d < 0 for d in difference)}",
            ]
            lines.append(f"| {routing} | {language} | " + " | ".join(cells) + " |")
    lines += ["", "Separated arm in full:", "", _details(results["separated"], arguments, _separation_note())]
    return "\n".join(lines)


def write_section(path: str, body: str, name: str = "transfer") -> None:
    """Replaces the text between the `name` markers of `path` (atomically)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} section to write into")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(head + begin + "\n" + body + "\n" + end + tail)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--sara-weight", type=float, default=1.5)
    parser.add_argument(
        "--base-routing",
        choices=(*BASE_ROUTINGS, "both"),
        default="shared",
        help="how the base model routes the languages: as plain pre-training leaves it (shared, the default), "
        "pushed to separate experts per language (separated), or both arms and their comparison (both)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 60 pre-training and 10 fine-tuning steps")
    parser.add_argument(
        "--write",
        metavar="MARKDOWN",
        help="write the report into this file's section: <!-- transfer:begin/end --> for shared, transfer-separated "
        "for separated, transfer-arms for both",
    )
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.pretrain_steps, arguments.finetune_steps = 60, 10
    torch.set_num_threads(min(2, torch.get_num_threads()))
    routings = BASE_ROUTINGS if arguments.base_routing == "both" else (arguments.base_routing,)
    start = time.perf_counter()
    results: dict[str, dict[int, dict]] = {routing: {} for routing in routings}
    with tempfile.TemporaryDirectory() as work_dir:
        for seed in arguments.seeds:
            for routing in routings:
                result = run_seed(
                    seed, arguments.pretrain_steps, arguments.finetune_steps, arguments.sara_weight, work_dir, routing
                )
                results[routing][seed] = result
                label = f"seed {seed}" if len(routings) == 1 else f"seed {seed}, {routing}"
                print(f"{label}: {result['accuracy']} ({result['seconds']:.0f} s)", flush=True)
    command = " ".join(["python benchmarks/transfer/run_transfer.py", *(sys.argv[1:] if argv is None else argv)])
    seconds = time.perf_counter() - start
    if arguments.base_routing == "both":
        report = format_comparison(results, command, arguments, seconds)
    else:
        note = _separation_note() if arguments.base_routing == "separated" else ""
        report = format_report(results[arguments.base_routing], command, arguments, seconds, note)
    print(report)
    if arguments.write:
        write_section(arguments.write, report, SECTIONS[arguments.base_routing])
    return results if arguments.base_routing == "both" else results[arguments.base_routing]


if __name__ == "__main__":
    main()
