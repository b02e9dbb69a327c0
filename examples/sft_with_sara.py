"""A plain TRL SFT script turned into SARA fine-tuning by three changed lines, marked `# SARA`.

    python examples/sft_with_sara.py --model ibm-granite/granite-3.1-1b-a400m-instruct --data pairs.jsonl
    HF_SARA_TINY=1 python examples/sft_with_sara.py --output-dir /tmp/tiny-sara   # offline smoke run on a CPU

`--data` is a paired dataset: each low-resource example with its high-resource anchor in `anchor_` columns (see the
README); by default, hf_sara's embedded demo pairs. Undo the three lines and this is TRL's SFT on the same data.
"""

import argparse
import os
import tempfile

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sara import SARAConfig, SARATrainer, patch_model, router_weight_names  # SARA: was `from trl import ...`
from hf_sara.testing import demo_data_path, save_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ibm-granite/granite-3.1-1b-a400m-instruct")
    parser.add_argument("--data", default=demo_data_path(), help="paired dataset (.jsonl)")
    parser.add_argument("--output-dir", default="sara-out")
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args()
    if os.environ.get("HF_SARA_TINY"):  # offline smoke mode: a tiny untrained MoE instead of a Hub model
        args.model, args.max_steps = save_tiny_model(tempfile.mkdtemp(prefix="tiny-moe-")), 2

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pairs = load_dataset("json", data_files=args.data, split="train")
    training_args = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=2,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        per_device_train_batch_size=8,
        max_length=2048,
        logging_steps=1,
        report_to="none",
    )
    peft_config = LoraConfig(  # LoRA on attention and on the routers
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=router_weight_names(model),
    )

    model = patch_model(model)  # SARA: the model exposes its routing
    trainer = SARATrainer(
        model=model,
        args=SARAConfig(**training_args),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )  # SARA: was SFTTrainer/SFTConfig  # noqa: E501
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
