"""`forgeml compress` for a language model: the trained model against its ONNX Runtime export in fp32 and int8.

Each variant is scored on the run's held-out split (loss and perplexity of the same tokens the run was
evaluated on) and timed decoding greedily: tokens/s at batch 1 (`generate`, one sequence) and at batch 8
(the serving engine, 8 sequences decoding together), and compared greedily with the original's text. The
selected variant, the fastest at batch 8 whose perplexity is within `TOLERANCE` of the original's, is
what `forgeml serve` runs. Writes `compress/compression.json` and `export/lm.onnx`, `export/lm.int8.onnx`.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from forgeml.evaluate.outputs import model_outputs
from forgeml.generate import GenerationOptions, generate
from forgeml.models.onnx_lm import OnnxCausalLM, export_causal_lm, quantize_causal_lm
from forgeml.serve.decoding import DecodingEngine, Job, Piece
from forgeml.tasks.language_modeling import CausalLM
from forgeml.workspace import atomic_write_json

ONNX_FILES = {"onnx_fp32": "export/lm.onnx", "onnx_int8": "export/lm.int8.onnx"}
TOLERANCE = 0.02  # largest relative perplexity increase a variant may have to be served
NEW_TOKENS = 64
REPEATS = 3


class _Scored(nn.Module):
    """`CausalLM`'s per-row loss with any engine producing the logits (an ONNX session has no parameters)."""

    forward = CausalLM.forward

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm


def compress_language_model(
    model: CausalLM, tokenizer: Any, held_out: Any, held_out_name: str, prompts: list[str], run_dir: Path
) -> dict[str, Any]:
    """Build, score and time the variants; write the comparison; return it."""
    lm = model.lm.eval()
    fp32_file, int8_file = run_dir / ONNX_FILES["onnx_fp32"], run_dir / ONNX_FILES["onnx_int8"]
    export_causal_lm(lm, fp32_file)
    quantize_causal_lm(fp32_file, int8_file)
    variants: dict[str, Any] = {
        "pytorch_fp32": lm,
        "onnx_fp32": OnnxCausalLM(fp32_file, lm),
        "onnx_int8": OnnxCausalLM(int8_file, lm),
    }
    files = {"pytorch_fp32": None, **ONNX_FILES}
    greedy = GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0)
    reference_texts: list[str] = []  # the original's (the first variant), which the others are compared with
    results = []
    for name, engine in variants.items():
        outputs, _ = model_outputs(_Scored(engine), held_out, 32)
        loss = float(outputs[:, 0].sum() / max(outputs[:, 1].sum(), 1))
        texts = [generate(engine, tokenizer, prompt, greedy).text for prompt in prompts]
        reference_texts = reference_texts or texts
        file = files[name]
        results.append(
            {
                "name": name,
                "file": file,
                "bytes": (run_dir / file).stat().st_size if file else _parameter_bytes(lm),
                "loss": loss,
                "perplexity": math.exp(loss) if loss < 700 else math.inf,
                "tokens_per_s_batch1": _tokens_per_second_alone(engine, tokenizer, prompts[0]),
                "tokens_per_s_batch8": _tokens_per_second_batched(engine, tokenizer, prompts, 8),
                "greedy_agreement": float(np.mean([a == b for a, b in zip(texts, reference_texts, strict=True)])),
            }
        )
    original = results[0]
    for result in results:
        result["perplexity_change"] = result["perplexity"] / original["perplexity"] - 1
        result["speedup_batch1"] = result["tokens_per_s_batch1"] / original["tokens_per_s_batch1"]
        result["speedup_batch8"] = result["tokens_per_s_batch8"] / original["tokens_per_s_batch8"]
    # Greedy text is reported, not required: any change in the numbers (int8 most of all) sends a long greedy
    # continuation elsewhere sooner or later, while the perplexity says whether the model got worse.
    eligible = [r for r in results if r["perplexity_change"] <= TOLERANCE]
    selected = max(eligible, key=lambda r: r["tokens_per_s_batch8"])["name"]
    report = {
        "kind": "language-model",
        "held_out": held_out_name,
        "tokens": int(outputs[:, 1].sum()),
        "prompts": len(prompts),
        "new_tokens": NEW_TOKENS,
        "tolerance": TOLERANCE,
        "variants": results,
        "selected": selected,
    }
    atomic_write_json(run_dir / "compress" / "compression.json", report)
    return report


def _tokens_per_second_alone(engine: Any, tokenizer: Any, prompt: str) -> float:
    """Greedy tokens/s of one sequence through `generate` (median of a few runs, after one warm-up)."""
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0)
    generate(engine, tokenizer, prompt, options)
    speeds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = generate(engine, tokenizer, prompt, options)
        speeds.append(result.completion_tokens / (time.perf_counter() - started))
    return statistics.median(speeds)


def _tokens_per_second_batched(engine: Any, tokenizer: Any, prompts: list[str], batch: int) -> float:
    """Tokens/s of `batch` greedy sequences decoding together in the serving engine (median of a few runs)."""
    return statistics.median(_batched_run(engine, tokenizer, prompts, batch) for _ in range(REPEATS))


def _batched_run(engine: Any, tokenizer: Any, prompts: list[str], batch: int) -> float:
    options = [GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0)]
    decoder = DecodingEngine(engine, tokenizer, max_batch=batch, max_queue=batch)
    finished = threading.Event()
    produced: list[int] = []

    def deliver(piece: Piece) -> None:
        if piece.finish_reason is not None:
            produced.append(piece.completion_tokens)
            if len(produced) == batch:
                finished.set()

    decoder.start()
    try:
        started = time.perf_counter()
        for index in range(batch):
            decoder.submit(Job(list(tokenizer(prompts[index % len(prompts)])["input_ids"]), options, deliver))
        finished.wait()
        return sum(produced) / (time.perf_counter() - started)
    finally:
        decoder.stop()


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prompts_from(texts: list[str], count: int = 8, characters: int = 40) -> list[str]:
    """Fixed prompts for the timing: the starts of held-out texts (or of the text, cut in pieces)."""
    joined = " ".join(t for t in texts if t)
    pieces = [joined[i : i + characters] for i in range(0, len(joined), max(characters, len(joined) // count))]
    return [p for p in pieces if p.strip()][:count] or ["The"]


def comparison_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a language model's comparison, for the CLI and the card."""
    header = [
        "variant",
        "MB",
        "perplexity",
        "change",
        "tokens/s at 1",
        "tokens/s at 8",
        "speed-up 1 / 8",
        "greedy same",
    ]
    rows = [
        [
            result["name"] + (" (selected)" if result["name"] == report["selected"] else ""),
            f"{result['bytes'] / 1e6:.1f}",
            f"{result['perplexity']:.3f}",
            f"{result['perplexity_change']:+.2%}",
            f"{result['tokens_per_s_batch1']:,.0f}",
            f"{result['tokens_per_s_batch8']:,.0f}",
            f"{result['speedup_batch1']:.2f}x / {result['speedup_batch8']:.2f}x",
            f"{result['greedy_agreement']:.0%}",
        ]
        for result in report["variants"]
    ]
    return header, rows
