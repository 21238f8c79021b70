"""adamoe-finetune's data, tokenized with the model's own tokenizer: documents cut into blocks
(``BlockDataset``), or supervised records, one example per row with the loss on the completion
(``SupervisedDataset``)."""

from __future__ import annotations

import os

import torch

from megatron_adamoe.errors import OptionError


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks of ``seq_length``: documents + EOS, concatenated, cut, shuffled once."""

    def __init__(self, documents, tokenizer, seq_length: int, seed: int) -> None:
        stream: list[int] = []
        for text in documents:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
        count = len(stream) // seq_length
        if count == 0:
            raise OptionError(
                f"data must hold at least seq_length ({seq_length}) tokens; it has "
                f"{len(stream)}: add text or lower --seq-length"
            )
        blocks = torch.tensor(stream[: count * seq_length]).view(count, seq_length)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        self.blocks = blocks[order]
        self.largest_id = int(self.blocks.max())

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, index: int) -> dict:
        tokens = self.blocks[index]
        return {
            "input_ids": tokens,
            "labels": tokens.clone(),
            "attention_mask": torch.ones_like(tokens),
        }


# Multiple-choice records are rendered through a template ({question}, {choices}); the answer
# choice's text is the completion, as lm-evaluation-harness scores it (target after " ").
DEFAULT_MC_TEMPLATE = "{question}\nAnswer:"
IGNORE_INDEX = -100  # labels the loss skips (transformers' and torch's convention)


def is_supervised(paths) -> bool:
    """Whether the first record of the first JSONL file is a prompt/completion or a
    question/choices/answer record."""
    import json

    for path in paths:
        if not path.endswith((".jsonl", ".json")):
            return False
        with open(path) as handle:
            for line in handle:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return False  # read_examples / iter_documents report it with its line
                    return isinstance(record, dict) and ("prompt" in record or "question" in record)
    return False


def read_examples(paths, template: str = DEFAULT_MC_TEMPLATE) -> list[tuple[str, str, str]]:
    """(prompt, completion, "file:line") of each JSONL record: ``prompt``/``completion``, or
    ``question``/``choices``/``answer`` (an index or the choice's text) through ``template``.
    A bad record is one line naming the file, the line and the fix."""
    from megatron_adamoe.data.corpus import iter_jsonl

    examples = []
    for path in paths:
        if not os.path.isfile(path) or not path.endswith((".jsonl", ".json")):
            raise OptionError(
                f"data ({path!r}) must be an existing .jsonl file of supervised records"
            )
        for where, record in iter_jsonl(path):
            examples.append((*_render(record, where, template), where))
    if not examples:
        raise OptionError(f"data ({' '.join(paths)}) holds no records; add some")
    return examples


def _render(record, where: str, template: str) -> tuple[str, str]:
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise OptionError(
                f"{where} prompt and completion must be strings, the completion "
                "not empty; fix that line"
            )
        return prompt, completion
    if isinstance(record, dict) and {"question", "choices", "answer"} <= set(record):
        prompt, choices, answer = render_choice(record, where, template)
        return prompt, " " + choices[answer]
    raise OptionError(
        f"{where} must be a prompt/completion record or a question/choices/answer record "
        "(supervised data: every record of a file alike); fix that line"
    )


def render_choice(record: dict, where: str, template: str) -> tuple[str, list, int]:
    """(prompt, choices, answer index) of a multiple-choice record: the one rendering that
    fine-tuning trains on and adamoe-eval's local tasks score."""
    if not isinstance(record, dict) or not {"question", "choices", "answer"} <= set(record):
        raise OptionError(
            f"{where} must be a question/choices/answer record (a multiple-choice task); fix "
            "that line"
        )
    choices, answer = record["choices"], record["answer"]
    if not (
        isinstance(choices, list)
        and len(choices) >= 2
        and all(isinstance(c, str) and c for c in choices)
    ):
        raise OptionError(
            f"{where} choices must be a list of at least 2 non-empty strings; fix that line"
        )
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise OptionError(
            f"{where} answer ({answer!r}) must be a choice's index in "
            f"[0, {len(choices) - 1}] or its text; fix that line"
        )
    lettered = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    try:
        prompt = template.format(question=record["question"], choices=lettered)
    except (KeyError, IndexError, ValueError) as error:
        raise OptionError(
            f"mc_template ({template!r}) must use only {{question}} and "
            f"{{choices}} ({error!r}); fix --mc-template"
        ) from None
    return prompt, choices, answer


class SupervisedDataset(torch.utils.data.Dataset):
    """One example per row: prompt + completion + EOS tokens, labels on the completion (and EOS)
    only. The prompt is tokenized with the tokenizer's default special tokens (a BOS where it
    adds one), the completion without, as lm-evaluation-harness encodes a context and its
    continuation. Shuffled once with ``seed``. A prompt too long for ``seq_length`` loses its
    first tokens (counted in ``truncated``); a completion too long is one line naming its
    record. Rows are padded per batch by ``collate``."""

    def __init__(self, examples, tokenizer, seq_length: int, seed: int) -> None:
        self.truncated = 0
        rows = []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for prompt, completion, where in examples:
            prompt_ids = tokenizer(prompt)["input_ids"]  # its default specials (BOS), as lm-eval
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
            room = seq_length - len(completion_ids)
            if room < 0:
                raise OptionError(
                    f"{where} completion is {len(completion_ids)} tokens, more than seq_length "
                    f"({seq_length}); raise --seq-length or shorten it"
                )
            if len(prompt_ids) > room:
                prompt_ids, self.truncated = (
                    prompt_ids[len(prompt_ids) - room :],
                    self.truncated + 1,
                )
            rows.append((prompt_ids + completion_ids, len(prompt_ids)))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        self.rows = [rows[i] for i in order.tolist()]
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        self.largest_id = max(max(ids) for ids, _ in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        ids, prompt_length = self.rows[index]
        labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
        return {"input_ids": ids, "labels": labels}

    def collate(self, items: list[dict]) -> dict:
        """Right-padded to the batch's longest row: attention mask 0 and labels ignored there."""
        width = max(len(item["input_ids"]) for item in items)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for item in items:
            pad = width - len(item["input_ids"])
            batch["input_ids"].append(item["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(item["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value) for key, value in batch.items()}


def per_example_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """The mean over examples of each example's mean next-token loss over its labelled tokens:
    every example weighs the same, so a global batch has one loss whatever its split over ranks
    and micro-batches (equal micro-batch sizes)."""
    shifted_BS = labels_BS[:, 1:]
    token_BS = torch.nn.functional.cross_entropy(
        logits_BSV[:, :-1].flatten(0, 1).float(),
        shifted_BS.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shifted_BS)
    counted_BS = (shifted_BS != IGNORE_INDEX).float()
    return ((token_BS * counted_BS).sum(1) / counted_BS.sum(1).clamp(min=1)).mean()
