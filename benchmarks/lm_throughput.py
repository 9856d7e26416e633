"""Language-model training throughput: forgeml's loop against the Hugging Face `Trainer`, same GPT, data and seed.

Both train the same randomly initialised GPT-2-style model (`examples/shakespeare_char.yaml`: 4 layers,
4 heads, 128 dims, context 64; the same initial weights) on the same 64-character blocks of Tiny
Shakespeare's first 90 % (character tokenizer), with the example's settings: batch 12, lr 1e-3, 5 %
warm-up, cosine decay to 1e-4, AdamW beta2 0.99, weight decay 0.1, gradient clipping 1.0, for
``--steps`` optimizer steps:

- ``forgeml``: `forgeml.train.loop.train` as `forgeml run` wires it (no evaluation during training);
- ``forgeml compiled``: the same with ``train.compile=true`` (`torch.compile` of the training step). The
  first round compiles with an empty cache (its wall time includes that); later rounds find the
  compiled kernels in the cache, as a user's second run does;
- ``trainer``: `transformers.Trainer` (`GPT2LMHeadModel`, the same blocks pre-packed as `input_ids` with
  `labels` a copy, as `run_clm.py` does; `default_data_collator`, its default optimizer), with
  `cosine_with_min_lr`.

Tokens/s = steps * batch * 64 / the training call's wall time (for the Trainer: building it plus
`train()`). MFU: nanoGPT's FLOPs estimate per token (6 x weights + attention) over the machine's
measured fp32 matmul peak. Afterwards both models are scored with the same code on the whole held-out
10 % (loss in nats per character), so a speed-up that costs accuracy shows. The contenders alternate
for ``--repeats`` rounds (the VM's speed drifts); CPU steal is recorded beside each run.

Run from the repository root::

    python benchmarks/lm_throughput.py --steps 2000 --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from machine import cpu_jiffies
from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

from forgeml.config import load_config
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks import build_task, prepare_data
from forgeml.train.loop import seed_everything, train
from forgeml.train.peak import matmul_peak_flops

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shakespeare_char.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "lm_throughput.json"


def steal_share(before: tuple[int, int, int]) -> float:
    after = cpu_jiffies()
    return (after[0] - before[0]) / max(after[2] - before[2], 1)


def train_forgeml(task: Any, model: Any, blocks: Any, config: Any, compiled: bool) -> float:
    settings = config.train.model_copy(update={"compile": compiled})
    started = time.perf_counter()
    train(task, model, blocks, None, settings)
    return time.perf_counter() - started


def train_trainer(model: Any, blocks: Any, config: Any, steps: int, folder: Path) -> float:
    rows = blocks.blocks.numpy()
    # As run_clm.py does: labels are a copy of the inputs and the model shifts them (the Trainer would drop
    # a `shift_labels` column as unused), so it predicts 63 of each block's 64 next characters.
    dataset = Dataset.from_dict({"input_ids": rows[:, :-1].tolist(), "labels": rows[:, :-1].tolist()})
    settings = config.train
    arguments = TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta2=settings.adam_beta2,
        max_grad_norm=settings.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": settings.lr * settings.min_lr_ratio},
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        max_steps=steps,
        seed=settings.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    started = time.perf_counter()
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return time.perf_counter() - started


def validation_loss(task: Any, model: Any, blocks: Any) -> float:
    outputs, _ = model_outputs(model, blocks, 64)
    return float(outputs[:, 0].sum() / outputs[:, 1].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    config = load_config(EXAMPLE, [f"train.max_steps={args.steps}"])
    if not config.data.train.is_file():
        sys.exit(f"needs {config.data.train}")
    data = prepare_data(config)
    task = build_task(config, data.input_columns)
    task.fit(data.train)
    train_blocks, validation_blocks = task.encode(data.train, "train"), task.encode(data.validation, "validation")
    seed_everything(config.train.seed)
    initial = task.build_model()
    tokens_per_run = args.steps * config.train.batch_size * config.block_size
    flops_per_run = initial.training_flops(range(args.steps * config.train.batch_size), config.block_size)
    peak = matmul_peak_flops()

    runs: dict[str, list[dict[str, float]]] = {"forgeml": [], "forgeml compiled": [], "trainer": []}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor")  # empty: round 1 compiles cold
        for round_index in range(args.repeats):
            for name in runs:
                model = copy.deepcopy(initial)
                before = cpu_jiffies()
                if name.startswith("forgeml"):
                    seconds = train_forgeml(task, model, train_blocks, config, compiled=name.endswith("compiled"))
                else:
                    seconds = train_trainer(model.lm, train_blocks, config, args.steps, Path(scratch) / name)
                steal = steal_share(before)
                loss = validation_loss(task, model, validation_blocks)
                runs[name].append(
                    {
                        "seconds": seconds,
                        "tokens_per_s": tokens_per_run / seconds,
                        "mfu": flops_per_run / seconds / peak,
                        "validation_loss": loss,
                        "steal": steal,
                    }
                )
                print(
                    f"round {round_index + 1} {name}: {tokens_per_run / seconds:,.0f} tokens/s, "
                    f"validation loss {loss:.4f}, steal {steal:.1%}",
                    flush=True,
                )
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()
    }
    paired = {
        name: [f["tokens_per_s"] / t["tokens_per_s"] for f, t in zip(runs[name], runs["trainer"], strict=True)]
        for name in ("forgeml", "forgeml compiled")
    }
    print("\n| contender (median) | tokens/s | this / trainer | MFU | validation loss | steal |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in summary.items():
        ratio = values["tokens_per_s"] / summary["trainer"]["tokens_per_s"]
        print(
            f"| {name} | {values['tokens_per_s']:,.0f} | {ratio:.2f}x | {values['mfu']:.1%} | "
            f"{values['validation_loss']:.4f} | {values['steal']:.1%} |"
        )
    for name, ratios in paired.items():
        print(f"{name} / trainer per round: " + ", ".join(f"{ratio:.2f}x" for ratio in ratios))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "summary": summary, "paired_ratios": paired, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
