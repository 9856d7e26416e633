"""The continuous-batching engine on tiny random models: a request's tokens do not depend on what else is
in the batch (greedy and seeded sampling, requests joining and leaving mid-way, GPT-2 and Llama), a
cancelled request leaves the batch at the next step, the queue is bounded, and a drain cuts what is
still running with finish reason "length"."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgeml.generate import GenerationOptions, generate
from forgeml.models.gpt import gpt_from_architecture
from forgeml.models.tokenizers import char_tokenizer
from forgeml.serve.decoding import FINISH_CANCELLED, Busy, DecodingEngine, Job, Piece

from conftest import save_tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the film was a gripping ride from start to end",
    "a dull and tedious story with weak jokes",
    "charming, witty and moving",
    "the plot",
    "nobody should sit through this clumsy mess of a film",
    "a superb cast",
    "lovely",
    "it was boring and the ending made no sense at all to anyone",
]
PROMPTS = ["the film", "a dull story", "charming", "the plot was", "nobody", "a superb cast and", "lovely", "it"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(TEXTS)  # every token decodes to a character: readable text


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    if request.param == "gpt2":
        architecture = {"n_layer": 2, "n_head": 2, "n_embd": 32, "context": 96, "dropout": 0.0}
        return gpt_from_architecture(architecture, len(tokenizer), "gpt2", tokenizer.eos_token_id).eval()
    folder: Path = tmp_path_factory.mktemp("llama")
    save_tiny_causal_lm("llama", tokenizer, folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


class Collector:
    """Gathers the pieces of jobs (from the engine's thread) until each choice has finished."""

    def __init__(self) -> None:
        self.pieces: dict[int, list[Piece]] = {}
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.expected = 0

    def job(self, engine: DecodingEngine, prompt_ids: list[int], *options: GenerationOptions) -> Job:
        number = len(self.pieces)
        self.pieces[number] = []
        self.expected += len(options)

        def deliver(piece: Piece) -> None:
            with self.lock:
                self.pieces[number].append(piece)
                if sum(p.finish_reason is not None for ps in self.pieces.values() for p in ps) == self.expected:
                    self.finished.set()

        return Job(prompt_ids, list(options), deliver)

    def text(self, number: int, choice: int = 0) -> str:
        return "".join(p.text for p in self.pieces[number] if p.choice == choice)

    def finish(self, number: int, choice: int = 0) -> str | None:
        return next((p.finish_reason for p in self.pieces[number] if p.choice == choice and p.finish_reason), None)


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def run_all(engine: DecodingEngine, collector: Collector, jobs: list[Job], late: list[Job] = ()) -> None:
    """Submit `jobs`, then `late` ones once the first has produced a token (so they join a running batch)."""
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
        for job in late:
            while not collector.pieces[0]:
                collector.finished.wait(0.01)  # polling for the first token, not timing anything
            engine.submit(job)
        assert collector.finished.wait(120), "the engine did not finish the jobs"
    finally:
        engine.stop()


def test_greedy_text_does_not_depend_on_the_batch(model, tokenizer):
    options = GenerationOptions(max_new_tokens=24, temperature=0)
    alone = [generate(model, tokenizer, prompt, options) for prompt in PROMPTS]
    engine = DecodingEngine(model, tokenizer, max_batch=8)
    collector = Collector()
    jobs = [collector.job(engine, ids(tokenizer, prompt), options) for prompt in PROMPTS]
    run_all(engine, collector, jobs[:5], late=jobs[5:])  # three join while five are decoding
    for number, expected in enumerate(alone):
        assert collector.text(number) == expected.text, PROMPTS[number]
        assert collector.finish(number) == expected.finish_reason
    assert engine.running == 0 and engine.waiting == 0


def test_seeded_sampling_and_several_choices_do_not_depend_on_the_batch(model, tokenizer):
    sampled = GenerationOptions(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    second = GenerationOptions(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=8)  # what choice 1 of seed 7 uses
    expected = [
        generate(model, tokenizer, "the film", sampled).text,
        generate(model, tokenizer, "the film", second).text,
    ]
    engine = DecodingEngine(model, tokenizer, max_batch=8)
    collector = Collector()
    jobs = [collector.job(engine, ids(tokenizer, "the film"), sampled, sampled)]  # n=2 from one seed
    jobs += [
        collector.job(engine, ids(tokenizer, p), GenerationOptions(max_new_tokens=10, temperature=0))
        for p in PROMPTS[:5]
    ]
    run_all(engine, collector, jobs)
    assert [collector.text(0, 0), collector.text(0, 1)] == expected
    assert expected[0] != expected[1]


def test_stop_strings_and_token_budget(model, tokenizer):
    options = GenerationOptions(max_new_tokens=30, temperature=0)
    free = generate(model, tokenizer, "the plot was", options).text
    assert len(free) > 6, free
    stop = free[3:6]
    engine = DecodingEngine(model, tokenizer, max_batch=4)
    collector = Collector()
    jobs = [
        collector.job(
            engine, ids(tokenizer, "the plot was"), GenerationOptions(max_new_tokens=30, temperature=0, stop=[stop])
        ),
        collector.job(engine, ids(tokenizer, "the plot was"), GenerationOptions(max_new_tokens=3, temperature=0)),
    ]
    run_all(engine, collector, jobs)
    assert collector.text(0) == free[: free.index(stop)]
    assert collector.finish(0) == "stop"
    assert collector.finish(1) == "length"
    assert [p.completion_tokens for p in collector.pieces[1] if p.finish_reason] == [3]


def test_a_cancelled_job_leaves_the_batch_at_the_next_step(model, tokenizer):
    engine = DecodingEngine(model, tokenizer, max_batch=4)
    collector = Collector()
    endless = GenerationOptions(max_new_tokens=10_000, temperature=1.0, seed=1)
    kept = collector.job(engine, ids(tokenizer, "the film"), GenerationOptions(max_new_tokens=40, temperature=0))
    gone = collector.job(engine, ids(tokenizer, "nobody"), endless)
    engine.start()
    try:
        engine.submit(gone)
        engine.submit(kept)
        while len(collector.pieces[0]) < 3:
            collector.finished.wait(0.01)  # polling for tokens, not timing anything
        engine.cancel(gone)
        assert collector.finished.wait(120)
    finally:
        engine.stop()
    assert collector.finish(1) == FINISH_CANCELLED
    assert collector.finish(0) in ("stop", "length")  # the other job went on to its own end
    assert engine.running == 0


def test_the_queue_is_bounded_and_a_drain_cuts_running_jobs(model, tokenizer):
    engine = DecodingEngine(model, tokenizer, max_batch=1, max_queue=1)
    collector = Collector()
    endless = GenerationOptions(max_new_tokens=10_000, temperature=1.0, seed=1)
    running, waiting, refused = (collector.job(engine, ids(tokenizer, "the film"), endless) for _ in range(3))
    engine.start()
    engine.submit(running)
    while not collector.pieces[0]:
        collector.finished.wait(0.01)  # polling for the first token, not timing anything
    engine.submit(waiting)
    with pytest.raises(Busy) as busy:
        engine.submit(refused)
    assert busy.value.retry_after >= 1
    engine.stop(drain_seconds=0)
    assert collector.finish(0) == "length" and collector.text(0)
    assert collector.finish(1) == "length" and collector.text(1) == ""
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(collector.job(engine, ids(tokenizer, "the film"), endless))
