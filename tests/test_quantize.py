"""Per-token int8: every constant matrix multiply quantized, and a row's answer independent of its batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from datasets import Dataset

from forgeml.export import OnnxModel, export_onnx
from forgeml.quantize import quantize_per_token

TEXTS = [
    "the film was great",
    "a dull and boring plot that goes on and on without any point at all, really",
    "fine",
    "I loved every minute of it",
    "terrible acting",
    "not bad",
]


@pytest.fixture(scope="module")
def exported(sentiment_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("quantize")
    rows = sentiment_model.task.encode(Dataset.from_dict({"text": TEXTS}), "check", with_targets=False)
    example, _ = rows.batch(range(len(TEXTS)))
    fp32 = export_onnx(sentiment_model.model, example, folder / "model.onnx")
    count = quantize_per_token(fp32, folder / "model.int8.onnx")
    return {"rows": rows, "fp32": fp32, "int8": folder / "model.int8.onnx", "count": count}


def test_every_constant_matmul_becomes_int8_and_the_fp32_weights_go(exported: dict) -> None:
    fp32, int8 = onnx.load(str(exported["fp32"])), onnx.load(str(exported["int8"]))
    weights = {initializer.name for initializer in fp32.graph.initializer}
    constant_matmuls = [n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert exported["count"] == len(constant_matmuls) > 0
    assert sum(n.op_type == "MatMulInteger" for n in int8.graph.node) == len(constant_matmuls)
    left = {initializer.name for initializer in int8.graph.initializer}
    assert not any(n.input[1] in left for n in int8.graph.node if n.op_type == "MatMul")
    # each weight now takes 1 byte instead of 4 (embedding tables stay fp32; the new nodes take a little)
    matmul_bytes = sum(
        4 * int(np.prod(i.dims)) for i in fp32.graph.initializer if i.name in {n.input[1] for n in constant_matmuls}
    )
    saved = exported["fp32"].stat().st_size - exported["int8"].stat().st_size
    assert saved > 0.5 * matmul_bytes


def test_a_rows_answer_is_the_same_alone_and_in_a_padded_batch(exported: dict) -> None:
    rows, model = exported["rows"], OnnxModel(exported["int8"])
    batched = model(**rows.batch(range(len(TEXTS)))[0]).numpy()  # padded to the longest text
    alone = np.concatenate([model(**rows.batch([row])[0]).numpy() for row in range(len(TEXTS))])
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_int8_stays_close_to_fp32(exported: dict) -> None:
    rows = exported["rows"]
    inputs = rows.batch(range(len(TEXTS)))[0]
    fp32 = OnnxModel(exported["fp32"])(**inputs).numpy()
    int8 = OnnxModel(exported["int8"])(**inputs).numpy()
    assert np.abs(int8 - fp32).max() < 0.05 * np.abs(fp32).max()


def test_an_all_zero_row_stays_zero(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    quantize_per_token(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    x = np.array([[0, 0, 0, 0], [1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    assert np.all(y[0] == 0)
    np.testing.assert_allclose(y[1], x[1] @ weight, atol=0.05)
