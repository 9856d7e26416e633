"""The peer of `generate_throughput.py`: what a user writes to serve a causal LM without forgeml.

A FastAPI app with a plain ``def`` endpoint that calls ``model.generate`` per request in a thread and streams
its text with transformers' ``TextIteratorStreamer`` as Server-Sent Events in OpenAI's completions shape
(enough for the same load client to read both servers). Greedy decoding (``do_sample=False``) when the
request's temperature is 0, as in the benchmark.

    python benchmarks/generate_peer_server.py RUN_DIR/model --port 8001
"""

from __future__ import annotations

import argparse
import json
import threading

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def create_app(folder: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/completions")
    def complete(body: dict) -> StreamingResponse:
        inputs = tokenizer(body["prompt"], return_tensors="pt")
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        settings = {"max_new_tokens": body.get("max_tokens", 16), "streamer": streamer}
        if body.get("temperature", 1.0) == 0:
            settings["do_sample"] = False
        else:
            settings.update(do_sample=True, temperature=body["temperature"])

        def run() -> None:
            with torch.inference_mode():
                model.generate(**inputs, **settings, pad_token_id=tokenizer.eos_token_id)

        threading.Thread(target=run, daemon=True).start()

        def events():
            for text in streamer:
                if text:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")
