"""Controlled transfer experiment: does SARA carry knowledge seen only in the anchor language over to other languages?

    python benchmarks/transfer/run_transfer.py --write BENCHMARKS.md    # 10 seeds, about 8 minutes on 2 CPU cores
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

The report gives mean and standard deviation over the seeds, whatever the outcome.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_languages import LANGUAGES, LOW_RESOURCE, World  # noqa: E402

BEGIN, END = "<!-- transfer:begin -->", "<!-- transfer:end -->"
ARMS = ("base", "SFT", "SARA")
COLUMNS = (*LOW_RESOURCE, "en")


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


def run_seed(seed: int, pretrain_steps: int, finetune_steps: int, sara_weight: float, work_dir: str) -> dict:
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
    SFTTrainer(
        model=base,
        args=SFTConfig(
            **training_arguments(os.path.join(work_dir, f"pretrain-{seed}"), pretrain_steps, 3e-3, seed, 32)
        ),
        train_dataset=Dataset.from_dict({"text": world.pretraining_texts()}).shuffle(seed=seed),
        processing_class=tokenizer,
    ).train()
    base_dir = os.path.join(work_dir, f"base-{seed}")
    base.save_pretrained(base_dir)

    models = {"base": base}
    for arm, trainer_class, config_class, extra in (
        ("SFT", SFTTrainer, SFTConfig, {}),
        ("SARA", SARATrainer, SARAConfig, {"sara_weight": sara_weight}),
    ):
        model = patch_model(Qwen3MoeForCausalLM.from_pretrained(base_dir))
        arguments = training_arguments(os.path.join(work_dir, f"{arm}-{seed}"), finetune_steps, 1e-3, seed, 16)
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


def format_report(results: dict[int, dict], command: str, arguments: argparse.Namespace, seconds: float) -> str:
    seeds = list(results)
    lines = [
        f"Command: `{command}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}; {seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}).",
        "",
        f"Pre-training {arguments.pretrain_steps} steps, fine-tuning {arguments.finetune_steps} steps (both arms, "
        f"same seed and data order), SARA weight {arguments.sara_weight}. Mean ± standard deviation over the seeds.",
        "",
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


def write_section(path: str, body: str) -> None:
    """Replaces the text between the transfer markers of `path` (atomically)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section to write into")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(head + BEGIN + "\n" + body + "\n" + END + tail)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> dict[int, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--sara-weight", type=float, default=1.5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 60 pre-training and 10 fine-tuning steps")
    parser.add_argument("--write", metavar="MARKDOWN", help="write the report into this file's transfer section")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.pretrain_steps, arguments.finetune_steps = 60, 10
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for seed in arguments.seeds:
            results[seed] = run_seed(
                seed, arguments.pretrain_steps, arguments.finetune_steps, arguments.sara_weight, work_dir
            )
            print(f"seed {seed}: {results[seed]['accuracy']} ({results[seed]['seconds']:.0f} s)", flush=True)
    command = " ".join(["python benchmarks/transfer/run_transfer.py", *(sys.argv[1:] if argv is None else argv)])
    report = format_report(results, command, arguments, time.perf_counter() - start)
    print(report)
    if arguments.write:
        write_section(arguments.write, report)
    return results


if __name__ == "__main__":
    main()
