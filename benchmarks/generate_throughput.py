"""Generation serving: `forgeml serve` (continuous batching) against the server a user would write (FastAPI +
``model.generate`` per request, streamed with ``TextIteratorStreamer``: `generate_peer_server.py`).

Both serve the same run's model folder on 127.0.0.1, each in its own process, started once and kept up;
the load alternates between them. The model: ``--run`` (a language-modeling or instruction-tuning run), or
by default a character GPT trained here on Tiny Shakespeare with the example's settings but a 256-token
context (so prompt + 64 new tokens fit) and 600 steps. The load is closed-loop: ``C`` clients (8 and
32), each streaming one completion after another (``--requests`` each), greedy, 64 new tokens, prompts the
first 40 characters of seeded random lines of the held-out tenth of Tiny Shakespeare. Reported per
contender and concurrency (median over ``--rounds`` alternating rounds): aggregate generated tokens/s (the
run's tokenizer's count of the text received), p50/p95 time to first token (request sent -> first text
received), and CPU steal. Greedy outputs of the two servers are compared prompt by prompt.

    python benchmarks/generate_throughput.py --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from machine import cpu_jiffies

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "datasets" / "tiny_shakespeare" / "input.txt"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "generate_throughput.json"
NEW_TOKENS = 64


def train_default_model(workspace: Path) -> Path:
    import forgeml

    overrides = [
        "model.architecture.context=256",
        "train.max_steps=600",
        "train.eval_every=600",
        "name=shakespeare_256",
    ]
    return forgeml.run(REPO / "examples" / "shakespeare_char.yaml", overrides, workspace=workspace).run_dir


def prompts(count: int) -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    lines = [line for line in text[int(len(text) * 0.9) :].splitlines() if len(line) >= 40]
    return [line[:40] for line in random.Random(0).sample(lines, count)]


def start(command: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{command[:4]} ended: {process.stderr.read()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)  # waiting for start-up, not timing anything
    sys.exit(f"{command[:4]} did not become ready")


def stream_completion(port: int, model: str, prompt: str) -> tuple[str, float | None]:
    """The streamed text and the seconds to its first non-empty piece."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    pieces, first = [], None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        for choice in json.loads(line[6:])["choices"]:
            if choice.get("text"):
                first = first if first is not None else time.perf_counter() - started
                pieces.append(choice["text"])
    connection.close()
    return "".join(pieces), first


def load(port: int, model: str, prompt_list: list[str], clients: int, requests: int, tokenizer: Any) -> dict[str, Any]:
    results: list[tuple[int, str, float | None]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for r in range(requests):
            number = index * requests + r
            text, first = stream_completion(port, model, prompt_list[number % len(prompt_list)])
            with lock:
                results.append((number, text, first))

    before = cpu_jiffies()
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    after = cpu_jiffies()
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text, _ in results)
    firsts = sorted(first for _, _, first in results if first is not None)
    return {
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "ttft_p50": statistics.median(firsts),
        "ttft_p95": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))],
        "steal": (after[0] - before[0]) / max(after[2] - before[2], 1),
        "texts": {number: text for number, text, _ in results},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a language-model run directory (default: train one here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per load")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    scratch = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    run = args.run or train_default_model(scratch)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    model_name = run.parent.name
    prompt_list = prompts(64)
    ours_port, peer_port = 8711, 8712
    environment_python = sys.executable
    servers = {
        "forgeml": start(
            [
                environment_python,
                "-m",
                "forgeml.cli",
                "serve",
                str(run),
                "--no-auth",
                "--port",
                str(ours_port),
                "--max-batch",
                "32",
                "--workspace",
                str(scratch),
            ],
            ours_port,
        ),
        "peer": start(
            [
                environment_python,
                str(REPO / "benchmarks" / "generate_peer_server.py"),
                str(run / "model"),
                "--port",
                str(peer_port),
            ],
            peer_port,
        ),
    }
    ports = {"forgeml": ours_port, "peer": peer_port}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {8: [], 32: []} for name in servers}
    try:
        for name in servers:  # warm-up, untimed
            load(ports[name], model_name, prompt_list, 4, 1, tokenizer)
        for round_index in range(args.rounds):
            for clients in (8, 32):
                requests = args.requests if clients == 8 else max(1, args.requests // 2)
                for name in servers:
                    result = load(ports[name], model_name, prompt_list, clients, requests, tokenizer)
                    runs[name][clients].append(result)
                    print(
                        f"round {round_index + 1}, {clients} clients, {name}: {result['tokens_per_s']:,.0f} tokens/s, "
                        f"TTFT p50 {result['ttft_p50'] * 1000:.0f} ms p95 {result['ttft_p95'] * 1000:.0f} ms, "
                        f"steal {result['steal']:.1%}",
                        flush=True,
                    )
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(timeout=60)
    summary: dict[str, Any] = {}
    print("\n| clients | contender | tokens/s | forgeml / peer | TTFT p50 | TTFT p95 | steal |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for clients in (8, 32):
        medians = {
            name: {
                k: statistics.median(r[k] for r in runs[name][clients])
                for k in ("tokens_per_s", "ttft_p50", "ttft_p95", "steal")
            }
            for name in servers
        }
        summary[clients] = medians
        for name, values in medians.items():
            ratio = medians["forgeml"]["tokens_per_s"] / values["tokens_per_s"]
            print(
                f"| {clients} | {name} | {values['tokens_per_s']:,.0f} | {ratio:.2f}x | "
                f"{values['ttft_p50'] * 1000:.0f} ms | {values['ttft_p95'] * 1000:.0f} ms | {values['steal']:.1%} |"
            )
    ours = {n: t for r in runs["forgeml"][8] for n, t in r["texts"].items()}
    peer = {n: t for r in runs["peer"][8] for n, t in r["texts"].items()}
    same = sum(ours[n] == peer[n] for n in ours if n in peer)
    print(f"greedy outputs equal to the peer's: {same} of {len(ours)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in runs:
        for clients in runs[name]:
            for result in runs[name][clients]:
                result.pop("texts")
    result = {"run": str(run), "summary": summary, "equal_outputs": [same, len(ours)], "runs": runs}
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if same != len(ours):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
