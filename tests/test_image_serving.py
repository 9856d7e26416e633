"""An image model exported and served: ONNX with parity and a statically quantized int8 file, compression
that measures them, and a real server that takes base64 JSON and multipart uploads, answers as `forgeml
predict` does, and gives every bad image request its 4xx."""

from __future__ import annotations

import base64
import csv
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import forgeml
from forgeml import api
from forgeml.config import ServeConfig
from forgeml.serve.app import create_app
from forgeml.serve.runtime import ModelRuntime
from test_image import image_config, png_bytes, stripes, write_npz

from serving import serving


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("image-run")
    npz = write_npz(folder / "stripes.npz", train=600, test=300)
    return forgeml.run(image_config(npz), workspace=folder / "workspace").run_dir


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with one part per file, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_export_checks_parity_and_quantizes_the_convolutions_statically(image_run: Path) -> None:
    import onnx

    report = api.export(image_run)
    fp32, int8 = report["checks"]["onnx_fp32"], report["checks"]["onnx_int8"]
    assert report["passed"] and fp32["max_abs_diff"] <= 1e-4
    assert int8["scheme"].startswith("static") and int8["label_agreement"] >= 0.99 and int8["passed"]
    quantized = onnx.load(str(image_run / "export" / "model.int8.onnx"))
    operators = {node.op_type for node in quantized.graph.node}
    # every convolution reads int8 weights through QDQ pairs; fp32 ONNX has none
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators
    assert int8["bytes"] < fp32["bytes"]

    comparison = api.compress(image_run)
    names = [variant["name"] for variant in comparison["variants"]]
    assert names[:1] == ["pytorch_fp32"] and {"onnx_fp32", "onnx_int8"} <= set(names)
    assert all(variant["metrics"]["accuracy"] >= 0.9 for variant in comparison["variants"])


def test_uploads_and_base64_get_the_label_forgeml_predict_gives(image_run: Path, tmp_path: Path) -> None:
    images, _ = stripes(6, seed=7)
    files = []
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
        files.append((f"{index}.png", (tmp_path / f"{index}.png").read_bytes()))
    with (tmp_path / "images.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image"], *[[name] for name, _ in files]])
    written = api.predict(image_run, tmp_path / "images.csv", tmp_path / "predicted.jsonl")
    expected = [json.loads(line)["prediction"] for line in written.read_text().splitlines()]

    with serving(create_app(ModelRuntime(image_run), None)) as client:
        body, headers = multipart(files)
        status, uploaded = client.call("POST", "/v1/predict/upload", body, headers=headers)
        assert status == 200, uploaded
        encoded = [base64.b64encode(data).decode() for _, data in files]
        status, as_json = client.call("POST", "/v1/predict", {"inputs": encoded})
        assert status == 200, as_json
        data_url = "data:image/png;base64," + encoded[0]
        status, one = client.call("POST", "/v1/predict", {"inputs": {"image": data_url}})
        assert status == 200, one
        status, described = client.call("GET", "/v1/models")
    assert [p["label"] for p in uploaded["predictions"]] == expected
    assert [p["label"] for p in as_json["predictions"]] == expected
    assert one["predictions"][0]["label"] == expected[0]
    assert uploaded["predictions"][0]["probabilities"] == pytest.approx(as_json["predictions"][0]["probabilities"])
    assert described["models"][0]["image_shape"] == [16, 16, 3]


def test_every_bad_image_request_gets_its_4xx(image_run: Path) -> None:
    image = png_bytes(stripes(1)[0][0])
    huge = io.BytesIO()
    Image.new("RGB", (300, 300)).save(huge, format="PNG")  # tiny file, 90,000 pixels
    settings = ServeConfig(max_body_bytes=64 * 1024, max_image_pixels=10_000, max_inputs=4)
    b64 = base64.b64encode
    json_requests = [
        ({"inputs": "not base64 at all!"}, 422, "not base64"),
        ({"inputs": b64(b"just some text, no image").decode()}, 422, "not a readable image"),
        ({"inputs": b64(image[: len(image) // 2]).decode()}, 422, "not a readable image"),  # truncated PNG
        ({"inputs": b64(huge.getvalue()).decode()}, 413, "300 x 300 pixels"),
        ({"inputs": {"picture": b64(image).decode()}}, 422, "keys ['picture']"),
        ({"inputs": "data:image/png,abc"}, 422, "must be base64"),
        ({"inputs": []}, 422, "empty"),
        ({"inputs": [b64(image).decode()] * 5}, 413, "at most 4"),
        ({"inputs": "A" * 100_000}, 413, "larger than"),  # over the body limit
    ]
    with serving(create_app(ModelRuntime(image_run), None, settings)) as client:
        for body, expected, message in json_requests:
            status, answer = client.call("POST", "/v1/predict", body)
            assert status == expected and message in json.dumps(answer), (body if len(str(body)) < 200 else "", answer)
        text, headers = multipart([("notes.txt", b"hello, not an image")])
        status, answer = client.call("POST", "/v1/predict/upload", text, headers=headers)
        assert status == 422 and "inputs[0]: not a readable image" in answer["detail"]
        wrong_field, headers = multipart([("a.png", image)], field="upload")
        status, answer = client.call("POST", "/v1/predict/upload", wrong_field, headers=headers)
        assert status == 422 and "file" in json.dumps(answer)
        status, answer = client.call("POST", "/v1/predict/upload", {"inputs": "x"})  # JSON where a form belongs
        assert status == 422
        status, answer = client.call("POST", "/v1/explain", {"inputs": b64(image).decode()})
        assert status == 404 and "image model" in answer["detail"]
        status, answer = client.call("POST", "/v1/predict", {"inputs": b64(image).decode()})
        assert status == 200  # the server still answers after all that


def test_an_upload_to_a_text_model_is_refused(sentiment_model) -> None:
    body, headers = multipart([("a.png", png_bytes(np.zeros((4, 4, 3), np.uint8)))])
    with serving(create_app(ModelRuntime(sentiment_model.run.path), None)) as client:
        status, answer = client.call("POST", "/v1/predict/upload", body, headers=headers)
    assert status == 404 and "image models" in answer["detail"]


def test_the_int8_onnx_engine_serves_the_labels_of_the_trained_model(image_run: Path) -> None:
    images, _ = stripes(40, seed=11)
    predictor = forgeml.load(image_run)
    expected = [answer["label"] for answer in predictor.predict(list(images))]
    api.export(image_run)
    runtime = ModelRuntime(image_run, engine="onnx")
    assert runtime.engine == "onnxruntime (onnx_int8)"
    served = [answer["label"] for answer in runtime.predict(list(images))]
    assert np.mean(np.array(served) == np.array(expected)) >= 0.95


def test_evaluate_scores_an_image_file_on_its_test_arrays(image_run: Path, tmp_path: Path) -> None:
    images, labels = stripes(120, seed=21)
    names = np.array(["horizontal", "vertical"])
    np.savez(
        tmp_path / "more.npz", x_train=images[:0], y_train=labels[:0], x_test=images, y_test=labels, class_names=names
    )
    metrics = api.evaluate(image_run, tmp_path / "more.npz")
    assert metrics["accuracy"] >= 0.9
    folder = next((image_run / "evaluations").glob("more-*"))
    assert (folder / "confusion_matrix.png").is_file()
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == 120  # every test array, not the train ones


def test_drift_monitoring_says_it_does_not_cover_images(image_run: Path) -> None:
    from forgeml.errors import ForgeError
    from forgeml.monitor import DriftMonitor

    with pytest.raises(ForgeError, match=r"drift monitoring: compares texts or table columns; .* is an image model"):
        _ = DriftMonitor(image_run).predictor
