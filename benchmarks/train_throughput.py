"""Training throughput: forgeml's loop against the Hugging Face `Trainer`, same model, data and seed.

Three contenders fine-tune the same network (the bundled all-MiniLM-L6-v2, mean pooling, a linear
head with 2 outputs) on the same seeded SST-2 subset, for one epoch at batch 32, lr 5e-5, linear
schedule with 6 % warm-up, weight decay 0.01:

- ``forgeml``: `forgeml.train.loop.train` as `forgeml run` wires it (length-grouped dynamic batches);
- ``trainer``: `transformers.Trainer` in its documented set-up (tokenize without padding,
  `DataCollatorWithPadding`, random batches);
- ``trainer-grouped``: the same with `train_sampling_strategy="group_by_length"`.

Each contender's training call is timed with a wall clock (for Trainer: building it plus `train()`),
samples/s = rows * epochs / seconds. Model FLOPs utilisation (MFU) sums `TextModel.training_flops`
over the batches each contender actually ran (recorded as they are built) and divides by seconds and
by the machine's measured fp32 matmul peak. After each run the model is scored on the same held-out
SST-2 rows with the same code, so a speed-up that costs accuracy shows.

The machine is a shared 2-core VM whose speed drifts (CPU steal of 20-45 % happens), so the runs
alternate (A B C, A B C, ... for ``--repeats`` rounds) rather than running one contender's repeats in
a row, medians and per-round (paired) ratios are reported, and beside each run its CPU steal share and
the share of machine CPU time other processes used (both from /proc/stat) are recorded: a run with
high values there is slow because of its neighbours, not its code. Untimed warm-up steps come first.

Run from the repository root (takes 10+ minutes with the defaults)::

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --rows 96 --val-rows 64 --repeats 1 --out /tmp/tt.json  # smoke test

Results: a Markdown table on stdout and JSON in ``benchmarks/out/train_throughput.json``.
"""

from __future__ import annotations

import os

# Before any Hugging Face import: no progress bars, no hub access, errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import csv
import gc
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset
from machine import cpu_jiffies, cpu_model
from torch import nn
from torch.nn import functional
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

import forgeml
from forgeml.config import ForgeConfig, load_config
from forgeml.data.io import column
from forgeml.data.prepare import prepare
from forgeml.evaluate.outputs import model_outputs
from forgeml.models.hf import TextModel
from forgeml.tasks import build_task
from forgeml.tasks.base import EncodedSplit
from forgeml.tasks.text import TextTask
from forgeml.train.loop import seed_everything, train
from forgeml.train.peak import matmul_peak_flops

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "train_throughput.json"
SEED = 42
EPOCHS = 1
LR = 5e-5
WARMUP_RATIO = 0.06
WEIGHT_DECAY = 0.01
CONTENDERS = ("forgeml", "trainer", "trainer-grouped")
# Above this share of machine CPU used by other processes a run's timing is unreliable: with 2 cores,
# torch's threads and a neighbour's threads preempt each other and a run can take 10x longer.
BUSY_PERCENT = 10.0


# ----------------------------------------------------------------------------- measurements


@dataclass
class BatchLog:
    """Shapes of the batches a contender trained on: real tokens per row and the padded width."""

    lengths: list[list[int]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)

    def add(self, lengths: Sequence[int], width: int) -> None:
        self.lengths.append([int(n) for n in lengths])
        self.widths.append(int(width))

    def flops(self, model: TextModel) -> float:
        return sum(model.training_flops(rows, width) for rows, width in zip(self.lengths, self.widths, strict=True))

    def padding_fraction(self) -> float:
        real = sum(sum(rows) for rows in self.lengths)
        padded = sum(len(rows) * width for rows, width in zip(self.lengths, self.widths, strict=True))
        return 1.0 - real / max(padded, 1)


@dataclass
class CpuSample:
    """Machine-wide jiffies since boot (the `cpu ` line of /proc/stat) and this process's CPU seconds."""

    steal: int
    idle: int
    total: int
    own_seconds: float

    @classmethod
    def now(cls) -> CpuSample:
        own = os.times()
        return cls(*cpu_jiffies(), own.user + own.system)

    def shares_since(self, before: CpuSample) -> tuple[float, float, float]:
        """(steal %, % of machine CPU time used by other processes, our CPU seconds) between two samples."""
        total = max(self.total - before.total, 1)
        busy = total - (self.idle - before.idle) - (self.steal - before.steal)
        own_seconds = self.own_seconds - before.own_seconds
        others = busy - own_seconds * os.sysconf("SC_CLK_TCK")
        return 100.0 * (self.steal - before.steal) / total, 100.0 * max(others, 0.0) / total, own_seconds


@dataclass
class RunRecord:
    round: int
    contender: str
    seconds: float
    cpu_seconds: float  # this process's CPU time: the work done, whatever the neighbours did
    rows: int
    samples_per_second: float
    mfu: float
    padding_fraction: float
    steal_percent: float
    others_percent: float
    accuracy: float
    batches: int
    extra: dict[str, Any] = field(default_factory=dict)


def measured(
    round_index: int,
    contender: str,
    rows: int,
    run: Callable[[], tuple[TextModel, BatchLog, dict[str, Any]]],
    evaluate: Callable[[TextModel], float],
    peak: float,
) -> RunRecord:
    """Time one training run (wall clock, steal and other processes' CPU share) and score its model."""
    gc.collect()
    before = CpuSample.now()
    start = time.perf_counter()
    model, batches, extra = run()
    seconds = time.perf_counter() - start
    steal, others, cpu_seconds = CpuSample.now().shares_since(before)
    return RunRecord(
        round=round_index,
        contender=contender,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        rows=rows,
        samples_per_second=rows * EPOCHS / seconds,
        mfu=batches.flops(model) / seconds / peak,
        padding_fraction=batches.padding_fraction(),
        steal_percent=steal,
        others_percent=others,
        accuracy=evaluate(model),
        batches=len(batches.widths),
        extra=extra,
    )


# ----------------------------------------------------------------------------- data


def write_subset(source: Path, target: Path, rows: int, seed: int) -> int:
    """A seeded random subset of a CSV file (all rows when `rows` >= its size); returns the row count."""
    with open(source, newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader)
        body = list(reader)
    if rows < len(body):
        body = random.Random(seed).sample(body, rows)
    with open(target, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(body)
    return len(body)


def forge_config(train_csv: Path, validation_csv: Path, max_length: int, batch_size: int) -> ForgeConfig:
    """The run config our contender trains with; cleaning is off so every contender sees the file's rows."""
    return load_config(
        {
            "name": "train-throughput",
            "task": "text-classification",
            "data": {
                "train": str(train_csv),
                "validation": str(validation_csv),
                "split": {"validation": 0.0, "test": 0.0},
                "clean": {"normalize": False, "drop_empty": False, "dedupe": False},
            },
            "model": {"backbone": "minilm", "max_length": max_length, "pooling": "mean", "dropout": 0.1},
            "train": {
                "epochs": EPOCHS,
                "batch_size": batch_size,
                "lr": LR,
                "scheduler": "linear",
                "warmup_ratio": WARMUP_RATIO,
                "weight_decay": WEIGHT_DECAY,
                "seed": SEED,
                "group_by_length": True,
                "early_stopping": None,
                "checkpoint_every": 10**9,
            },
        }
    )


def trainer_dataset(task: TextTask, texts: list[str], labels: np.ndarray, max_length: int) -> Dataset:
    """Trainer's documented input: token ids without padding (the collator pads each batch) plus labels."""
    tokenizer = task.tokenizer
    dataset = Dataset.from_dict({"text": texts, "labels": labels.tolist()})
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


# ----------------------------------------------------------------------------- contenders


def fresh_model(task: TextTask) -> TextModel:
    """The same starting weights for every run: the checkpoint plus a head drawn from seed 42."""
    seed_everything(SEED)
    return task.build_model()


class RecordingSplit:
    """An EncodedSplit that notes the rows of every batch the training loop asks for."""

    def __init__(self, split: EncodedSplit, log: BatchLog):
        self.split = split
        self.lengths = split.lengths
        self.log = log

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        lengths = self.lengths[list(rows)]
        self.log.add(lengths, lengths.max())  # TokenizedSplit pads to the longest row
        return self.split.batch(rows)


def train_forgeml(
    task: TextTask, config: ForgeConfig, split: EncodedSplit
) -> tuple[TextModel, BatchLog, dict[str, Any]]:
    model = fresh_model(task)
    log = BatchLog()
    result = train(task, model, RecordingSplit(split, log), None, config.train)
    # The loop's own numbers count only time inside batches; reported beside ours for reference.
    return model, log, {"loop_samples_per_second": result.samples_per_second, "loop_mfu": result.mfu}


class TrainerModel(nn.Module):
    """TextModel in the shape Trainer expects: keyword inputs in, {"loss", "logits"} out."""

    def __init__(self, model: TextModel):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids, attention_mask, token_type_ids)
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = functional.cross_entropy(logits, labels)
        return output


class RecordingCollator:
    """DataCollatorWithPadding that also notes each batch's real lengths and padded width."""

    def __init__(self, collator: DataCollatorWithPadding, log: BatchLog):
        self.collator = collator
        self.log = log

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.log.add(mask.sum(dim=1).tolist(), mask.shape[1])
        return batch


def train_hf_trainer(
    task: TextTask, dataset: Dataset, batch_size: int, grouped: bool, output_dir: Path
) -> tuple[TextModel, BatchLog, dict[str, Any]]:
    model = fresh_model(task)
    log = BatchLog()
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP_RATIO,  # transformers 5: a float < 1 is a ratio (warmup_ratio is gone)
        num_train_epochs=EPOCHS,
        seed=SEED,
        data_seed=SEED,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # transformers 5: replaces group_by_length=True
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    trainer = Trainer(
        model=TrainerModel(model),
        args=arguments,
        train_dataset=dataset,
        data_collator=RecordingCollator(DataCollatorWithPadding(task.tokenizer), log),
        processing_class=task.tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics even with logging off
    output = trainer.train()
    return model, log, {"optimizer": arguments.optim, "train_loss": output.training_loss}


def warm_up(task: TextTask, split: EncodedSplit, batch_size: int) -> None:
    """A few untimed training steps so the first timed run does not pay for thread and kernel start-up."""
    model = fresh_model(task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for start in range(0, min(len(split), 3 * batch_size), batch_size):
        inputs, targets = split.batch(range(start, min(start + batch_size, len(split))))
        functional.cross_entropy(model(**inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()


# ----------------------------------------------------------------------------- report


def median_of(records: list[RunRecord], contender: str, name: str) -> float:
    return statistics.median(getattr(r, name) for r in records if r.contender == contender)


def summarise(records: list[RunRecord]) -> dict[str, Any]:
    """Medians per contender, ratios of medians, and the ratios within each round (paired, less noisy)."""
    medians = {
        contender: {
            name: median_of(records, contender, name)
            for name in (
                "seconds",
                "cpu_seconds",
                "samples_per_second",
                "mfu",
                "padding_fraction",
                "steal_percent",
                "others_percent",
                "accuracy",
            )
        }
        for contender in CONTENDERS
    }
    ours = medians["forgeml"]["samples_per_second"]
    ratios = {f"forgeml/{other}": ours / medians[other]["samples_per_second"] for other in CONTENDERS[1:]}
    speeds: dict[int, dict[str, float]] = {}
    for record in records:
        speeds.setdefault(record.round, {})[record.contender] = record.samples_per_second
    paired = {
        f"forgeml/{other}": [round_speeds["forgeml"] / round_speeds[other] for round_speeds in speeds.values()]
        for other in CONTENDERS[1:]
    }
    return {"medians": medians, "ratios_of_medians": ratios, "ratios_per_round": paired}


def markdown(records: list[RunRecord], summary: dict[str, Any]) -> str:
    lines = [
        "| round | contender | seconds | CPU s | samples/s | MFU | padding | steal | other procs | val accuracy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        busy = " *" if r.others_percent > BUSY_PERCENT else ""
        lines.append(
            f"| {r.round} | {r.contender} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | {r.samples_per_second:.2f} | "
            f"{r.mfu:.1%} | {r.padding_fraction:.1%} | {r.steal_percent:.1f} % | {r.others_percent:.1f} %{busy} | "
            f"{r.accuracy:.4f} |"
        )
    if any(r.others_percent > BUSY_PERCENT for r in records):
        lines.append(
            f"\n\\* other processes used over {BUSY_PERCENT:.0f} % of the CPU: this run's timing is unreliable"
        )
    lines += [
        "",
        "| contender (median) | samples/s | forgeml / this | MFU | padding | steal | other procs | val accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for contender, m in summary["medians"].items():
        ratio = summary["ratios_of_medians"].get(f"forgeml/{contender}", 1.0)
        lines.append(
            f"| {contender} | {m['samples_per_second']:.2f} | {ratio:.2f}x | {m['mfu']:.1%} | "
            f"{m['padding_fraction']:.1%} | {m['steal_percent']:.1f} % | {m['others_percent']:.1f} % | "
            f"{m['accuracy']:.4f} |"
        )
    lines.append("")
    for name, values in summary["ratios_per_round"].items():
        lines.append(f"{name} per round: " + ", ".join(f"{v:.2f}x" for v in values))
    return "\n".join(lines)


def machine_info(peak: float) -> dict[str, Any]:
    import accelerate

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_flops": peak,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "forgeml": forgeml.__version__,
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="SST-2 training rows (seeded random subset)")
    parser.add_argument("--val-rows", type=int, default=872, help="SST-2 validation rows scored after each run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every contender once")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per input (longer ones are truncated)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    peak = matmul_peak_flops("cpu")  # measured once and cached, outside every timed run
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as folder:
        tmp = Path(folder)
        rows = write_subset(DATASETS / "sst2" / "train.csv", tmp / "train.csv", args.rows, SEED)
        val_rows = write_subset(DATASETS / "sst2" / "validation.csv", tmp / "validation.csv", args.val_rows, SEED)
        config = forge_config(tmp / "train.csv", tmp / "validation.csv", args.max_length, args.batch_size)
        data = prepare(config)
        task = build_task(config, data.input_columns)
        assert isinstance(task, TextTask)
        task.fit(data.train)
        train_split = task.encode(data.train, "train")
        validation_split = task.encode(data.validation, "validation")
        labels = task.target.encode(column(data.train, "label"), "train")
        hf_train = trainer_dataset(task, column(data.train, "text"), labels, args.max_length)
        assert [len(ids) for ids in hf_train["input_ids"]] == train_split.lengths.tolist(), "tokenization differs"

        def accuracy(model: TextModel) -> float:
            outputs, targets = model_outputs(model, validation_split, batch_size=64)
            return float(task.metrics(outputs, targets)["accuracy"])

        runs: dict[str, Callable[[], tuple[TextModel, BatchLog, dict[str, Any]]]] = {
            "forgeml": lambda: train_forgeml(task, config, train_split),
            "trainer": lambda: train_hf_trainer(task, hf_train, args.batch_size, False, tmp / "trainer"),
            "trainer-grouped": lambda: train_hf_trainer(task, hf_train, args.batch_size, True, tmp / "trainer"),
        }
        print(
            f"{rows} training rows, {val_rows} validation rows, batch {args.batch_size}, max length "
            f"{args.max_length}, {args.repeats} round(s) of {', '.join(CONTENDERS)}",
            file=sys.stderr,
        )
        warm_up(task, train_split, args.batch_size)
        records: list[RunRecord] = []
        for round_index in range(1, args.repeats + 1):
            for contender in CONTENDERS:
                record = measured(round_index, contender, len(train_split), runs[contender], accuracy, peak)
                records.append(record)
                print(
                    f"round {round_index} {contender}: {record.samples_per_second:.2f} samples/s, "
                    f"steal {record.steal_percent:.1f} %, other processes {record.others_percent:.1f} %, "
                    f"accuracy {record.accuracy:.4f}",
                    file=sys.stderr,
                )

    summary = summarise(records)
    print(markdown(records, summary))
    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": {
            "model": "TextModel minilm (all-MiniLM-L6-v2), mean pooling, dropout 0.1, 2 outputs",
            "train_rows": rows,
            "validation_rows": val_rows,
            "epochs": EPOCHS,
            "lr": LR,
            "warmup_ratio": WARMUP_RATIO,
            "weight_decay": WEIGHT_DECAY,
            "seed": SEED,
            "timed": "forgeml: train(); trainer: Trainer(...) + trainer.train()",
        },
        "machine": machine_info(peak),
        "runs": [asdict(r) for r in records],
        **summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
