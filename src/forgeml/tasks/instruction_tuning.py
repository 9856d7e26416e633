"""instruction-tuning: supervised fine-tuning of a pre-trained causal LM on prompt -> response examples.

Each example becomes one token sequence: the prompt (or a conversation rendered with a chat template)
followed by the response and an end-of-sequence token, so that generation learns where to stop. The
loss counts response tokens only by default (`train.loss_on: response`): prompt positions get label
-100, as in TRL's completion-only training. An example longer than `model.max_length` (capped at the
model's context) loses its end; how many did is counted and reported, never silent.

Templates (`data.template`):
- `plain`: the prompt's tokens, then the response's, then end-of-sequence (TRL's prompt-completion
  format for models without a chat template). Generation prompts are the bare prompt text.
- `chat`: the tokenizer's chat template, or for a model without one a built-in template that ends
  every turn with the tokenizer's end-of-sequence token; the built-in one is saved with the tokenizer,
  so plain transformers (`apply_chat_template`) renders prompts the way the model was trained.
  Conversations are rendered turn by turn and each turn's text is tokenized on its own, so the
  assistant turns (the learnt part) are known token-exactly.

With `data.packing`, short examples share a row: their position ids restart at each example, which
makes transformers build an attention mask with no attention across examples.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoConfig, PreTrainedTokenizerBase

from forgeml.data.instructions import MESSAGES_COLUMN, as_conversation
from forgeml.errors import DataError, ForgeError
from forgeml.models.hf import load_tokenizer, resolve_backbone
from forgeml.tasks.base import HuggingFaceFolderTask
from forgeml.tasks.language_modeling import (
    CausalLM,
    ExampleSplit,
    build_causal_lm,
    load_saved_causal_lm,
    save_causal_lm,
    summed_losses,
)
from forgeml.workspace import atomic_write_text

# Zephyr's template with the tokenizer's own end-of-sequence token closing every turn.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATE_NAMES = {
    "plain": "plain (prompt, response, end-of-sequence)",
    "chat": "the tokenizer's chat template",
    "builtin": "built-in chat template (Zephyr-style turns, each ending with the end-of-sequence token)",
}
SAMPLE_COUNT = 3
GENERATIONS = "generations.jsonl"  # every scored answer of the generation evaluation


class PackedSplit:
    """Examples laid end to end in rows of `width` tokens; position ids restart at each example."""

    def __init__(self, inputs: list[np.ndarray], labels: list[np.ndarray], width: int, pad_id: int, counts: dict):
        # In order, each row takes examples until the next would overflow it (examples are at most `width` long).
        rows: list[list[int]] = []
        filled = width
        for index, example in enumerate(inputs):
            if filled + len(example) > width:
                rows.append([])
                filled = 0
            rows[-1].append(index)
            filled += len(example)
        self.input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        self.labels = np.full((len(rows), width), -100, dtype=np.int64)
        self.position_ids = np.zeros((len(rows), width), dtype=np.int64)
        for row, members in enumerate(rows):
            start = 0
            for index in members:
                length = len(inputs[index])
                self.input_ids[row, start : start + length] = inputs[index]
                self.labels[row, start : start + length] = labels[index]
                self.position_ids[row, start : start + length] = np.arange(length)
                start += length
            # The padding after the last example is a sequence of its own (positions from 0), learnt from nowhere.
            self.position_ids[row, start:] = np.arange(width - start)
        self.counts = {**counts, "packed_rows": len(rows)}
        self.lengths = np.full(len(rows), width, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        index = list(rows)
        labels = torch.from_numpy(self.labels[index])
        inputs = {
            "input_ids": torch.from_numpy(self.input_ids[index]),
            "labels": labels,
            "position_ids": torch.from_numpy(self.position_ids[index]),
        }
        return inputs, (labels != -100).sum(dim=1)


class InstructionTuningTask(HuggingFaceFolderTask):
    """Supervised fine-tuning of a causal LM on prompt/response pairs or conversations."""

    name = "instruction-tuning"
    primary_metric = "loss"
    target = None  # answers are generated text: no label-based baselines or audits
    generates = True  # Predictor.generate / forgeml generate work on it

    def __init__(
        self,
        model: dict[str, Any],
        max_length: int,
        options: dict[str, Any],
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        self.model_options = dict(model)  # backbone, lora
        self.options = dict(options)  # template, loss_on, packing, columns
        self.tokenizer = tokenizer or load_tokenizer(self.model_options["backbone"])
        if self.tokenizer.eos_token_id is None:
            raise DataError(
                f"model.backbone {self.model_options['backbone']!r}: its tokenizer has no end-of-sequence token, "
                "so a fine-tuned model could not learn where to stop"
            )
        if self.tokenizer.pad_token_id is None:  # padding is masked out: any id will do, eos is the convention
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The resolved template and length go back into the options, so a saved task rebuilds exactly.
        self.template = self.options["template"] = self._resolve_template(self.options["template"])
        self.max_length = self.options["context"] = min(max_length, self._context(self.options.get("context")))

    def _resolve_template(self, requested: str) -> str:
        """'plain', 'chat' (the tokenizer's) or 'builtin' (ours, installed on the tokenizer so it is saved)."""
        if requested in TEMPLATE_NAMES and requested != "chat":
            chosen = requested
        elif self.tokenizer.chat_template:
            chosen = "chat"
        elif requested == "chat" or self.options.get("columns") == [MESSAGES_COLUMN]:
            chosen = "builtin"
        else:
            chosen = "plain"
        if chosen == "builtin":
            self.tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
        return chosen

    def _context(self, saved: int | None) -> int:
        if saved:
            return int(saved)
        config = AutoConfig.from_pretrained(resolve_backbone(self.model_options["backbone"]))
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name in ("max_position_embeddings", "n_positions"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        return 1 << 30

    @property
    def text_columns(self) -> list[str]:
        return list(self.options["columns"])

    @property
    def template_name(self) -> str:
        return TEMPLATE_NAMES[self.template]

    # --- rendering ----------------------------------------------------------------------------------------

    def pieces(self, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
        """The conversation as (token ids, is an assistant turn) pieces, in order."""
        if self.template == "plain":
            user = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
            response = next(m["content"] for m in messages if m["role"] == "assistant")
            return [(self._encode(user, special=True), False), (self._response_ids(response), True)]
        pieces, rendered = [], ""
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._render(messages[:index], generation_prompt=True)
                pieces.append((self._encode(self._after(rendered, prompt), special=False), False))
                rendered = prompt
            text = self._render(messages[: index + 1], generation_prompt=False)
            ids = self._encode(self._after(rendered, text), special=False)
            is_response = message["role"] == "assistant"
            if is_response and self.tokenizer.eos_token_id not in ids:
                ids.append(self.tokenizer.eos_token_id)
            pieces.append((ids, is_response))
            rendered = text
        return pieces

    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """The token ids that ask the model for a response: a prompt string (one user turn) or the conversation
        so far, rendered as in training."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.template == "plain":
            return self._encode("\n".join(m["content"] for m in messages if m["role"] != "assistant"), special=True)
        return self._encode(self._render(messages, generation_prompt=True), special=False)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    @staticmethod
    def _after(rendered: str, text: str) -> str:
        if not text.startswith(rendered):
            raise DataError(
                "the chat template renders a conversation differently once a turn is added, so the response "
                "tokens cannot be told apart; set data.template: plain or use a standard template"
            )
        return text[len(rendered) :]

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []

    def _response_ids(self, response: str) -> list[int]:
        return [*self._encode(response, special=False), self.tokenizer.eos_token_id]

    # --- the Task protocol ----------------------------------------------------------------------------------

    def read_file(self, path: Path, config: Any) -> Dataset:
        """Examples from a file with the run's columns (`forgeml evaluate RUN --data FILE`)."""
        from forgeml.data.instructions import read_examples

        return read_examples(path, config)

    def fit(self, train: Dataset) -> None:
        """Nothing to learn from the data: the tokenizer is the backbone's."""

    def build_model(self) -> CausalLM:
        return build_causal_lm(self.model_options)

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> ExampleSplit | PackedSplit:
        inputs, labels, counts = self._tokenize(dataset, self.options["loss_on"])
        if counts["no_response_tokens"] == len(dataset):
            raise DataError(
                f"{source or 'input'}: no example keeps a response token within model.max_length "
                f"{self.max_length}; raise it or shorten the prompts"
            )
        pad = self.tokenizer.pad_token_id
        if self.options.get("packing"):
            return PackedSplit(inputs, labels, self.max_length, pad, counts)
        return ExampleSplit(inputs, labels, pad, counts)

    def _tokenize(self, dataset: Dataset, loss_on: str) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
        """Each example's input ids and pre-shifted labels (-100 where nothing is learnt), cut to max_length."""
        inputs, labels = [], []
        counts = {"examples": len(dataset), "truncated": 0, "no_response_tokens": 0, "tokens": 0, "learnt_tokens": 0}
        for row in dataset:
            ids, learnt = [], []
            for piece, is_response in self.pieces(as_conversation(row)):
                ids += piece
                learnt += [is_response or loss_on == "all"] * len(piece)
            if len(ids) > self.max_length + 1:
                counts["truncated"] += 1
                ids, learnt = ids[: self.max_length + 1], learnt[: self.max_length + 1]
            targets = np.where(np.array(learnt[1:], dtype=bool), np.array(ids[1:], dtype=np.int64), -100)
            if not (targets != -100).any():
                counts["no_response_tokens"] += 1
            inputs.append(np.array(ids[:-1], dtype=np.int64))
            labels.append(targets)
            counts["tokens"] += len(ids) - 1
            counts["learnt_tokens"] += int((targets != -100).sum())
        return inputs, labels, counts

    def paired_scores(self, model: CausalLM, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Per example: the summed loss (nats) of its responses given the conversation before them (whatever
        `loss_on` trained), and the responses' characters. Per character, two models with different
        tokenizers or templates are scored on the same footing (the promotion gate pairs them by example)."""
        inputs, labels, _ = self._tokenize(dataset, "response")
        losses = summed_losses(model, ExampleSplit(inputs, labels, self.tokenizer.pad_token_id, {}))
        characters = [
            sum(len(m["content"]) for m in as_conversation(row) if m["role"] == "assistant") for row in dataset
        ]
        return losses[:, 0], np.array(characters, dtype=np.float64)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every learnt token in the batch."""
        return outputs[:, 0].sum() / outputs[:, 1].sum().clamp(min=1)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        tokens = float(outputs[:, 1].sum())
        loss = float(outputs[:, 0].sum()) / max(tokens, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "tokens": int(tokens)}

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        raise ForgeError("an instruction-tuned model generates text: use forgeml generate (or Predictor.generate)")

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """None beyond the training curves."""

    def token_profile(self, split: ExampleSplit | PackedSplit) -> dict[str, int]:
        """Examples, tokens, learnt (response) tokens, and how many examples were truncated."""
        return dict(split.counts)

    # --- generation -------------------------------------------------------------------------------------------

    def answer(self, model: CausalLM, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[str, str]:
        """The greedy answer to a conversation whose last turn is the user's, and its finish reason."""
        from forgeml.generate import GenerationOptions, generate

        options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0, truncate="left")
        generation = generate(model.lm, self.tokenizer, self.prompt_ids(messages), options)
        return generation.text, generation.finish_reason

    def evaluate_generations(
        self, model: CausalLM, dataset: Dataset, options: dict[str, Any], seed: int, folder: Path
    ) -> dict[str, Any]:
        """Greedy answers to (a seeded choice of) the split's prompts, scored against the reference responses.

        Returns the mean score under `options["metric"]` and the share of answers that ended with the
        end-of-sequence token before `max_new_tokens`; every answer goes to `folder`/generations.jsonl.
        """
        from forgeml.evaluate.generation import score_answer

        rows = list(range(len(dataset)))
        if options.get("max_examples") and len(rows) > options["max_examples"]:
            rows = sorted(random.Random(seed).sample(rows, options["max_examples"]))
        records, scores, stopped = [], [], 0
        for index in rows:
            asked, reference = _last_answer(as_conversation(dataset[index]))
            answer, finish = self.answer(model, asked, options["max_new_tokens"])
            score = score_answer(answer, reference, options["metric"])
            scores.append(score)
            stopped += finish == "stop"
            records.append({"row": index, "prompt": asked, "reference": reference, "answer": answer})
            records[-1].update(score=score, finish_reason=finish)
        atomic_write_text(folder / GENERATIONS, "".join(json.dumps(record) + "\n" for record in records))
        return {
            options["metric"]: float(np.mean(scores)),
            "ended_with_eos": stopped / len(rows),
            "generated_examples": len(rows),
        }

    def samples(self, model: CausalLM, held_out: Dataset, seed: int) -> list[dict[str, Any]]:
        """Greedy answers to the first held-out prompts, beside their references (card, samples.jsonl)."""
        samples = []
        for row in held_out.select(range(min(SAMPLE_COUNT, len(held_out)))):
            asked, reference = _last_answer(as_conversation(row))
            answer, _ = self.answer(model, asked, 64)
            prompt = asked[-1]["content"] if asked else ""
            samples.append({"prompt": prompt, "seed": seed, "temperature": 0.0, "text": answer, "reference": reference})
        return samples

    # --- saving -----------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"text_columns": self.text_columns},
            "model": self.model_options,
            "options": self.options,  # template and context resolved
        }

    def save(self, folder: Path, model: CausalLM) -> None:
        """The (merged) model and tokenizer as a Hugging Face folder, LoRA adapters in adapter/, plus task.json."""
        save_causal_lm(folder, model, self.model_options)
        self.save_inputs(folder)

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any = None) -> InstructionTuningTask:
        options = dict(state["options"])
        return cls(dict(state["model"]), int(options["context"]), options, load_tokenizer(str(folder)))

    @classmethod
    def load(cls, folder: Path, state: dict[str, Any], target: Any = None) -> tuple[InstructionTuningTask, CausalLM]:
        task = cls.from_saved(folder, state)
        return task, load_saved_causal_lm(folder, task.model_options)


def _last_answer(conversation: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The conversation up to its last assistant turn (what the model is asked) and that turn's text."""
    last = max(index for index, message in enumerate(conversation) if message["role"] == "assistant")
    return conversation[:last], conversation[last]["content"]
