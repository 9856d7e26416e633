"""The memorisation audit of causal LMs (trust.memorization) on tiny GPT-2 models with a character tokenizer:
canaries and their insertion, exposure, verbatim extraction, window membership inference and the entry point.

Models are trained here by a plain AdamW loop on random windows, a few hundred steps each: long enough to
memorise a short text or a canary, short enough that the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from forgeml.errors import ConfigError, DataError
from forgeml.models.gpt import gpt_from_architecture
from forgeml.models.tokenizers import char_tokenizer
from forgeml.trust import memorization
from forgeml.trust.membership import loss_threshold_attack
from forgeml.trust.memorization import (
    Canary,
    audit_memorization,
    canary_exposures,
    card_section,
    exposure,
    extraction_rate,
    insert_canaries,
    make_canaries,
    plan_canaries,
    resolve_options,
    window_membership,
)

CONTEXT = 64
PNG = b"\x89PNG\r\n\x1a\n"


# Models this small run faster on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def random_words(characters: int, seed: int) -> str:
    """Seeded nonsense words with no letter doubled: no two places share a long context, so a model can
    only continue it by having memorised it (and never has to count repeated letters)."""
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(word) + 1 for word in words) < characters:
        word = ""
        for _ in range(rng.randint(2, 7)):
            word += rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if not word or c != word[-1]])
        words.append(word)
    return " ".join(words)[:characters]


def tiny_gpt(tokenizer: PreTrainedTokenizerFast, width: int = 64, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    architecture = {"n_layer": 2, "n_head": 2, "n_embd": width, "context": CONTEXT}
    return gpt_from_architecture(architecture, len(tokenizer), "gpt2", tokenizer.eos_token_id).eval()


def fit(
    lm: PreTrainedModel, stream: np.ndarray, steps: int, batch: int, window: int, lr: float, cyclic: bool = False
) -> float:
    """AdamW with a linear decay to zero on random windows of `window + 1` tokens of `stream`; returns the
    last loss. `cyclic` lets windows wrap around the end, so every token is seen at every window position."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    data = torch.from_numpy(np.concatenate([stream, stream]) if cyclic else stream)
    starts_below = len(stream) if cyclic else len(stream) - window
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    lm.train()
    for _ in range(steps):
        rows = torch.stack([data[start : start + window + 1] for start in rng.integers(0, starts_below, size=batch)])
        logits = lm(input_ids=rows[:, :-1], attention_mask=torch.ones_like(rows[:, :-1])).logits
        loss = functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    lm.eval()
    return loss.item()


def stream_of(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    return memorization._token_stream(tokenizer, texts)


# --- canaries --------------------------------------------------------------------------------------


def test_make_canaries_is_seeded_and_gives_count_per_repetition_count() -> None:
    canaries = make_canaries(3, repetitions=(1, 5, 20), seed=7, digits=6)
    assert make_canaries(3, repetitions=(1, 5, 20), seed=7, digits=6) == canaries
    assert make_canaries(3, repetitions=(1, 5, 20), seed=8, digits=6) != canaries
    assert [c.repetitions for c in canaries] == [1, 1, 1, 5, 5, 5, 20, 20, 20]
    assert len({c.secret for c in canaries}) == 9
    for canary in canaries:
        assert canary.text == canary.prefix + canary.secret == "my secret number is " + canary.secret
        assert canary.digits == 6 and all(part.isdigit() and len(part) == 1 for part in canary.secret.split(" "))
        assert Canary.from_dict(json.loads(json.dumps(canary.to_dict()))) == canary
    # Between them the secrets use every digit, so a tokenizer trained on the text knows all ten.
    assert set("".join(c.secret for c in canaries).replace(" ", "")) == set("0123456789")


def test_plan_canaries_follows_the_options() -> None:
    planned = plan_canaries({"seed": 3, "canaries": {"count": 2, "repetitions": [1, 4], "digits": 5}})
    assert planned == make_canaries(2, (1, 4), seed=3, digits=5)
    assert plan_canaries({"canaries": {"count": 0}}) == []
    assert len(plan_canaries()) == 4 * 3  # defaults: 4 canaries for each of 1, 5 and 20 repetitions


def test_insert_canaries_into_one_text_adds_whole_lines_and_nothing_else() -> None:
    text = "".join(f"line {i} of the play\n" for i in range(200)) + "a last line without a break"
    canaries = make_canaries(2, repetitions=(1, 5, 20), seed=0)
    inserted = insert_canaries([text], canaries, seed=4)
    assert insert_canaries([text], canaries, seed=4) == inserted
    assert insert_canaries([text], canaries, seed=5) != inserted
    assert len(inserted) == 1
    lines = inserted[0].split("\n")
    for canary in canaries:
        assert lines.count(canary.text) == canary.repetitions  # whole lines, exactly as many as asked
        assert inserted[0].count(canary.text) == canary.repetitions
    texts = {canary.text for canary in canaries}
    assert "\n".join(line for line in lines if line not in texts) == text


def test_insert_canaries_into_many_documents_adds_documents() -> None:
    documents = [f"review number {i}: fine" for i in range(50)]
    canaries = make_canaries(1, repetitions=(1, 5), seed=0)
    inserted = insert_canaries(documents, canaries, seed=1)
    assert insert_canaries(documents, canaries, seed=1) == inserted
    assert documents == [f"review number {i}: fine" for i in range(50)]  # the input is left alone
    assert len(inserted) == 50 + 6
    assert [inserted.count(c.text) for c in canaries] == [1, 5]
    assert [d for d in inserted if d not in {c.text for c in canaries}] == documents
    assert inserted[:6] != [c.text for c in canaries for _ in range(c.repetitions)]  # spread, not bunched


def test_insert_canaries_refuses_what_is_not_a_list_of_documents() -> None:
    canaries = make_canaries(1, repetitions=(1,), seed=0)
    with pytest.raises(DataError, match="documents"):
        insert_canaries("one text", canaries)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="documents"):
        insert_canaries([], canaries)


# --- exposure --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary_tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer([random_words(2000, 0), "0123456789", memorization.DEFAULT_PREFIX])


def test_memorised_canary_gets_the_largest_exposure_and_a_fresh_model_a_small_one(canary_tokenizer) -> None:
    canary = make_canaries(1, repetitions=(1,), seed=0)[0]
    fresh = exposure(tiny_gpt(canary_tokenizer), canary_tokenizer, canary, candidates=500)
    max_bits = 9 * math.log2(10)
    assert fresh["max_exposure"] == pytest.approx(max_bits)
    assert fresh["better_candidates"] > 0 and fresh["exposure"] < 8, fresh  # measured 0.3 bits
    assert fresh["rank"] == pytest.approx(1 + 10**9 * fresh["better_candidates"] / 500)
    assert fresh["exposure"] == pytest.approx(max_bits - math.log2(fresh["rank"]))

    lm = tiny_gpt(canary_tokenizer)
    sequence = stream_of(canary_tokenizer, [canary.text])  # the canary, then end-of-text
    sequence = np.concatenate([sequence[-1:], sequence[:-1]])  # end-of-text first: the context it is scored in
    fit(lm, sequence, steps=120, batch=1, window=len(sequence) - 1, lr=5e-3)
    memorised = exposure(lm, canary_tokenizer, canary, candidates=500)
    assert memorised["better_candidates"] == 0
    assert memorised["exposure"] == pytest.approx(max_bits)
    assert memorised["log_perplexity"] < fresh["log_perplexity"]


def test_canaries_of_one_format_share_the_scored_candidates(canary_tokenizer) -> None:
    lm = tiny_gpt(canary_tokenizer)
    canaries = make_canaries(2, repetitions=(1, 3), seed=1)
    together = canary_exposures(lm, canary_tokenizer, canaries, candidates=200, seed=5)
    alone = [exposure(lm, canary_tokenizer, canary, candidates=200, seed=5) for canary in canaries]
    for shared, single in zip(together, alone, strict=True):
        assert shared["better_candidates"] == single["better_candidates"]
        assert shared["log_perplexity"] == pytest.approx(single["log_perplexity"], rel=1e-5)
    assert [r["repetitions"] for r in together] == [1, 1, 3, 3]


def test_texts_of_different_token_lengths_score_as_they_do_alone(canary_tokenizer) -> None:
    """Right padding and the attention mask: a batch of unequal lengths gives each text its own score."""
    lm = tiny_gpt(canary_tokenizer)
    texts = ["my secret", "my secret number is 1 2 3", "ab", random_words(60, 3)]
    sequences = [stream_of(canary_tokenizer, [text]).tolist() for text in texts]
    batched = memorization._summed_nll(lm, sequences, batch_tokens=4096)
    with torch.inference_mode():
        for sequence, score in zip(sequences, batched, strict=True):
            ids = torch.tensor([sequence])
            alone = functional.cross_entropy(lm(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
            assert score == pytest.approx(float(alone), rel=1e-4)


def test_exposure_refuses_a_tokenizer_that_never_saw_the_digits() -> None:
    tokenizer = char_tokenizer([random_words(500, 0), memorization.DEFAULT_PREFIX])
    canary = make_canaries(1, repetitions=(1,), seed=0)[0]
    with pytest.raises(DataError, match="before the tokenizer is trained"):
        exposure(tiny_gpt(tokenizer), tokenizer, canary, candidates=10)


# --- a model that memorised a short text: extraction and membership --------------------------------


@pytest.fixture(scope="module")
def memorised() -> tuple[PreTrainedModel, PreTrainedTokenizerFast, str]:
    """A tiny GPT that has learnt 120 characters of nonsense words by heart (every 8-token prompt continues right)."""
    text = random_words(120, 1)
    tokenizer = char_tokenizer([text, random_words(4000, 2), random_words(4000, 3)])
    lm = tiny_gpt(tokenizer)
    loss = fit(lm, stream_of(tokenizer, [text]), steps=250, batch=16, window=24, lr=5e-3, cyclic=True)
    assert loss < 0.3, loss  # the first tokens of a window lack context; the rest are known by heart
    return lm, tokenizer, text


def test_memorised_text_is_extracted_and_unseen_text_is_not(memorised) -> None:
    lm, tokenizer, text = memorised
    train = extraction_rate(lm, tokenizer, [text], prompts=100, prefix_tokens=8, suffix_tokens=8, seed=0)
    assert train == {
        "rate": 1.0,
        "matches": 100,
        "prompts": 100,
        "prefix_tokens": 8,
        "suffix_tokens": 8,
        "mean_matched_tokens": 8.0,
    }
    held_out = extraction_rate(lm, tokenizer, [random_words(4000, 2)], prompts=100, prefix_tokens=8, suffix_tokens=8)
    assert held_out["rate"] == 0.0 and held_out["mean_matched_tokens"] < 1.0
    fresh = extraction_rate(
        tiny_gpt(tokenizer, seed=1), tokenizer, [text], prompts=100, prefix_tokens=8, suffix_tokens=8
    )
    assert fresh["rate"] == 0.0


def test_batched_greedy_decoding_with_the_cache_equals_decoding_without_it(memorised) -> None:
    lm, tokenizer, _ = memorised
    prompts = torch.from_numpy(stream_of(tokenizer, [random_words(400, 4)])[:240].reshape(30, 8))
    cached = memorization._greedy(lm, prompts, new_tokens=12, batch_tokens=100)  # five batches of 6 rows
    sequence = prompts
    with torch.inference_mode():
        for _ in range(12):
            sequence = torch.cat([sequence, lm(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, sequence[:, 8:])


def test_extraction_needs_prompt_and_continuation_to_fit(memorised) -> None:
    lm, tokenizer, text = memorised
    with pytest.raises(ConfigError, match="context"):
        extraction_rate(lm, tokenizer, [text], prefix_tokens=40, suffix_tokens=40)
    with pytest.raises(DataError, match="tokens"):
        extraction_rate(lm, tokenizer, ["short"], prefix_tokens=8, suffix_tokens=8)


def test_membership_attack_separates_memorised_windows_and_not_two_unseen_texts(memorised) -> None:
    lm, tokenizer, text = memorised
    leaked = window_membership(lm, tokenizer, [text], [random_words(4000, 2)], windows=500, window_tokens=8)
    assert leaked["members"]["count"] == leaked["non_members"]["count"] == 15  # 120 characters hold 15 windows
    assert leaked["auc"] > 0.8, leaked["auc"]  # measured 1.00
    assert leaked["window_tokens"] == 8 and "leakage" in leaked["verdict"]

    # Neither side was trained on and both come from one generator: nothing to tell apart. 500 windows a side
    # give the AUC a standard error of about 0.018; 0.1 is over five of them (and the seeds are fixed).
    same = window_membership(lm, tokenizer, [random_words(4000, 3)], [random_words(4000, 2)], window_tokens=8)
    assert same["members"]["count"] == 500
    assert abs(same["auc"] - 0.5) < 0.1, same["auc"]  # measured 0.51
    assert same["auc_ci95"][0] < 0.5 < same["auc_ci95"][1]


def test_loss_threshold_attack_on_loss_arrays() -> None:
    rng = np.random.default_rng(0)
    separated = loss_threshold_attack(rng.uniform(0, 1, 100), rng.uniform(2, 3, 100), bootstrap=20)
    assert separated["auc"] == 1.0 and separated["advantage"] == 1.0 and separated["tpr_at_1pct_fpr"] == 1.0
    losses = rng.uniform(0, 1, 100)
    same = loss_threshold_attack(losses, losses, bootstrap=0, seed=4)
    assert same["auc"] == pytest.approx(0.5) and same["auc_ci95"] is None and same["seed"] == 4
    with pytest.raises(ValueError, match="non_member_losses"):
        loss_threshold_attack(losses, np.array([]))


# --- the whole audit on Tiny Shakespeare with canaries ---------------------------------------------


@pytest.fixture(scope="module")
def shakespeare(shared_datasets: Path) -> dict:
    """10,000 characters of Tiny Shakespeare with 3 canaries inserted once and 3 inserted 20 times, learnt for
    about 25 passes: enough to memorise what is there 20 times, not what is there once."""
    path = shared_datasets / "tiny_shakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (Tiny Shakespeare lives in ../shared/datasets beside the checkout)")
    text = path.read_text(encoding="utf-8")
    train, held_out = text[:10_000], text[10_000:16_000]
    canaries = make_canaries(3, repetitions=(1, 20), seed=0)
    documents = insert_canaries([train], canaries, seed=0)
    tokenizer = char_tokenizer(documents)  # trained on the text with the canaries, as a run must
    lm = tiny_gpt(tokenizer)
    fit(lm, stream_of(tokenizer, documents), steps=300, batch=16, window=CONTEXT, lr=5e-3)
    return {"lm": lm, "tokenizer": tokenizer, "train": documents, "held_out": [held_out], "canaries": canaries}


def test_exposure_rises_with_repetitions(shakespeare: dict) -> None:
    records = canary_exposures(shakespeare["lm"], shakespeare["tokenizer"], shakespeare["canaries"], candidates=1000)
    once = [r["exposure"] for r in records if r["repetitions"] == 1]
    twenty = [r["exposure"] for r in records if r["repetitions"] == 20]
    # Measured: 1.1, 2.2, 2.3 bits once; 29.9, 29.9, 10.0 bits twenty times (of 29.9 possible); canaries and
    # insertion places of seed 1 give 0.9, 4.0, 0.7 and 29.9 three times.
    assert min(twenty) > max(once), (once, twenty)
    assert np.mean(twenty) > np.mean(once) + 5


def test_audit_returns_the_documented_sections_and_writes_its_plots(shakespeare: dict, tmp_path: Path) -> None:
    lm = shakespeare["lm"]
    lm.train()  # the audit must evaluate without dropout and give the mode back
    options = {
        "seed": 1,
        "canaries": {"candidates": 200},
        "extraction": {"prompts": 20},
        "membership": {"windows": 40, "bootstrap": 20},
    }
    result = audit_memorization(
        lm,
        shakespeare["tokenizer"],
        shakespeare["train"],
        shakespeare["held_out"],
        options,
        tmp_path,
        shakespeare["canaries"],
    )
    assert lm.training
    lm.eval()
    assert set(result) == {"canaries", "extraction", "membership", "plots", "options"}
    assert json.loads(json.dumps(result, allow_nan=False)) == result

    canaries = result["canaries"]
    assert [row["repetitions"] for row in canaries["table"]] == [1, 20]
    for row in canaries["table"]:
        assert row["canaries"] == 3
        assert 0 <= row["min_exposure"] <= row["mean_exposure"] <= row["max_exposure"] <= row["max_possible_exposure"]
        assert row["max_possible_exposure"] == pytest.approx(9 * math.log2(10))
    assert canaries["table"][1]["mean_exposure"] > canaries["table"][0]["mean_exposure"]
    assert canaries["candidates"] == 200 and len(canaries["canaries"]) == 6

    extraction = result["extraction"]
    assert extraction["train"]["prompts"] == extraction["held_out"]["prompts"] == 20
    assert extraction["train"]["prefix_tokens"] == extraction["train"]["suffix_tokens"] == 32  # half the context
    assert extraction["excess_rate"] == extraction["train"]["rate"] - extraction["held_out"]["rate"]

    windows = result["membership"]
    assert windows["window_tokens"] == CONTEXT and windows["members"]["count"] == 40
    assert 0 <= windows["auc"] <= 1 and windows["auc_ci95"] is not None and windows["verdict"].startswith("AUC")

    assert result["plots"] == [memorization.EXPOSURE_PLOT, memorization.ROC_PLOT]
    for name in result["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    section = card_section(result)
    assert section["title"] and section["tables"][0]["rows"][0][0] == 1
    assert [plot["path"] for plot in section["plots"]] == [f"trust/{name}" for name in result["plots"]]


def test_audit_without_canaries_skips_that_section(shakespeare: dict, tmp_path: Path) -> None:
    options = {"extraction": {"prompts": 5}, "membership": {"windows": 10, "bootstrap": 0}}
    result = audit_memorization(
        shakespeare["lm"], shakespeare["tokenizer"], shakespeare["train"], shakespeare["held_out"], options, tmp_path
    )
    assert "skipped" in result["canaries"]
    assert result["plots"] == [memorization.ROC_PLOT]
    assert "not measured" in card_section(result)["paragraphs"][0]


# --- options ---------------------------------------------------------------------------------------


def test_options_fill_defaults_and_name_bad_keys() -> None:
    resolved = resolve_options({"canaries": {"count": 2}})
    assert resolved["canaries"] == {**memorization.DEFAULT_OPTIONS["canaries"], "count": 2}
    assert resolved["membership"] == memorization.DEFAULT_OPTIONS["membership"]
    with pytest.raises(ConfigError, match=r"audit\.memorization: unknown key\(s\) canary"):
        resolve_options({"canary": {}})
    with pytest.raises(ConfigError, match=r"audit\.memorization\.extraction: unknown key\(s\) prefix;"):
        resolve_options({"extraction": {"prefix": 4}})
    with pytest.raises(ConfigError, match=r"audit\.memorization\.canaries\.repetitions"):
        resolve_options({"canaries": {"repetitions": [1, 1]}})
    with pytest.raises(ConfigError, match=r"audit\.memorization\.membership\.windows: must be an integer >= 2"):
        resolve_options({"membership": {"windows": 1}})
