"""Do a model's answers depend on what it is batched with? Each ONNX file of a run, every sentence scored
alone and in shuffled batches of 32 (padded to the longest, as the server batches concurrent requests).

    .venv/bin/python benchmarks/batch_invariance.py runs/sst2/<run-id> [--data ../shared/datasets/sst2/validation.csv]

For each file: labels that differ between alone and batched, agreement with the PyTorch model's labels,
accuracy, median latency of one-row calls and rows/s in batches of 32. `--candidates` also builds the int8
schemes compared when the served int8 format was chosen (onnxruntime's dynamic quantization, one
activation scale per batch; weight-only int8 blocks with int8 or fp32 compute, with onnx-ir installed)
into a scratch folder and measures them the same way. Re-export the run first (`forgeml export RUN`) so
its int8 file is the current scheme.
JSON goes to benchmarks/out/batch_invariance.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import forgeml
from forgeml.data.io import read_table
from forgeml.evaluate.outputs import model_outputs
from forgeml.export import OnnxModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "sst2" / "validation.csv"


def scored(model, split, rows: list[int]) -> np.ndarray:
    inputs, _ = split.batch(rows)
    with torch.inference_mode():
        return model(**inputs).float().numpy()


def alone_and_batched(model, split, seed: int = 0, batch: int = 32) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Outputs of every row scored alone, and in shuffled batches; the one-row call latencies (ms)."""
    alone, latencies = [], []
    for row in range(len(split)):
        started = time.perf_counter()
        alone.append(scored(model, split, [row])[0])
        latencies.append((time.perf_counter() - started) * 1000)
    order = np.random.default_rng(seed).permutation(len(split))
    batched = np.empty((len(split), len(alone[0])), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch].tolist()
        batched[rows] = scored(model, split, rows)
    return np.stack(alone), batched, latencies


def throughput(model, split, batch: int = 32) -> float:
    started = time.perf_counter()
    model_outputs(model, split, batch)
    return len(split) / (time.perf_counter() - started)


def candidates(fp32: Path, folder: Path) -> dict[str, Path]:
    """The int8 schemes compared with the served one (per-token, `forgeml.quantize`): what each does to
    activations decides whether a row's answer can depend on the other rows of its batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    # onnxruntime's dynamic quantization: one activation scale for the whole padded batch.
    target = folder / "dynamic_per_tensor.onnx"
    quantize_dynamic(
        str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"]
    )
    files["dynamic_per_tensor"] = target
    try:  # weight-only int8 (MatMulNBits) needs the onnx-ir package, not a forgeml dependency
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        print("weight-only int8 skipped: pip install onnx-ir to compare it")
        return files
    # Weight-only int8 in blocks of 128 along K; accuracy_level 4 quantizes activations per row and block
    # (int8 dot products), 0 keeps fp32 compute. Neither looks at other rows.
    for level in (4, 0):
        quantizer = MatMulNBitsQuantizer(str(fp32), bits=8, block_size=128, is_symmetric=True, accuracy_level=level)
        quantizer.process()
        target = folder / f"weight_only_int8_acc{level}.onnx"
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
        files[f"weight_only_int8_acc{level}"] = target
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--candidates", action="store_true", help="also build and measure the int8 schemes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    predictor = forgeml.load(args.run_dir)
    table = read_table(args.data)
    labels = [str(label) for label in table[predictor.config.data.label]]
    rows = predictor.prepare_inputs(table.remove_columns([predictor.config.data.label]))
    split = predictor.task.encode(rows, "check", with_targets=False)
    classes = list(predictor.task.target.classes)
    reference, _ = model_outputs(predictor.model, split)
    files = {
        "onnx_fp32": args.run_dir / "export" / "model.onnx",
        "onnx_int8 (per token, served)": args.run_dir / "export" / "model.int8.onnx",
    }
    scratch = Path(tempfile.mkdtemp(prefix="invariance-"))
    if args.candidates:
        files |= candidates(files["onnx_fp32"], scratch)
    results = {}
    for name, path in files.items():
        if not path.is_file():
            continue
        model = OnnxModel(path, threads=args.threads)
        alone, batched, latencies = alone_and_batched(model, split)
        answers = np.array(classes)[alone.argmax(axis=1)]
        results[name] = {
            "file": path.name,
            "mb": path.stat().st_size / 1e6,
            "differ_alone_vs_batched": int((alone.argmax(axis=1) != batched.argmax(axis=1)).sum()),
            "max_abs_diff_alone_vs_batched": float(np.abs(alone - batched).max()),
            "agreement_with_pytorch": float((alone.argmax(axis=1) == reference.argmax(axis=1)).mean()),
            "accuracy": float(np.mean(answers == np.array(labels))),
            "p50_ms_batch1": statistics.median(latencies),
            "rows_per_s_batch32": throughput(model, split),
        }
        print(name, json.dumps(results[name]), flush=True)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_invariance.json").write_text(json.dumps({"rows": len(split), "results": results}, indent=2))
    print(f"{'file':<30} {'MB':>6} {'differ':>6} {'same as torch':>13} {'accuracy':>8} {'p50 ms':>7} {'rows/s':>7}")
    for name, r in results.items():
        print(
            f"{name:<30} {r['mb']:6.1f} {r['differ_alone_vs_batched']:6d} {r['agreement_with_pytorch']:13.2%} "
            f"{r['accuracy']:8.4f} {r['p50_ms_batch1']:7.2f} {r['rows_per_s_batch32']:7.0f}"
        )


if __name__ == "__main__":
    main()
