"""Tokenisation equals TRL 1.16's prepared data set; truncation and drops are counted."""

from __future__ import annotations

import warnings

import trl
from datasets import Dataset

from dpolab.data.formats import example_from_row
from dpolab.data.tokenize import tokenize_pairs
from tests.tiny import tiny_tokenizer

ROWS = [
    {"prompt": "Natalia sold clips", "chosen": " to 48 of her friends", "rejected": " in April"},
    {"prompt": "two plus ", "chosen": "two is four", "rejected": "three"},  # boundary merges differ
    {"prompt": "Human: how do I bake bread? Assistant:", "chosen": " mix flour", "rejected": " bake"},
]


def test_token_ids_equal_trl_prepared_dataset(tmp_path):
    tokenizer = tiny_tokenizer()
    pairs, report = tokenize_pairs(tokenizer, [example_from_row(r, i) for i, r in enumerate(ROWS)], max_length=None)
    assert report.kept == 3
    from tests.tiny import tiny_llama

    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=tiny_llama(tokenizer, 0),
            ref_model=tiny_llama(tokenizer, 1),
            args=args,
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tokenizer,
        )
    for pair, prepared in zip(pairs, trainer.train_dataset, strict=True):
        assert list(pair.prompt_ids) == prepared["prompt_ids"]
        assert list(pair.chosen_ids) == prepared["chosen_ids"]
        assert list(pair.rejected_ids) == prepared["rejected_ids"]
        assert pair.chosen_ids[-1] == tokenizer.eos_token_id


def test_truncation_and_drops_are_counted():
    tokenizer = tiny_tokenizer()
    long_prompt = "Natalia sold clips to 48 of her friends in April " * 4
    examples = [
        example_from_row(
            {"prompt": "Q", "chosen": " two plus two is four and three times three is nine", "rejected": " no"}, 0
        ),
        example_from_row({"prompt": long_prompt, "chosen": " yes", "rejected": " no"}, 1),
        example_from_row({"prompt": "Q", "chosen": " yes", "rejected": " no"}, 2),
    ]
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=8)
    assert [p.row for p in pairs] == [0, 2]
    assert report.truncated_rows == [0] and report.dropped_rows == [1]
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 8 for p in pairs)
    text = "\n".join(report.lines())
    assert "1 pairs had a completion truncated" in text and "1 pairs dropped" in text and "rows 1" in text


def test_conversational_rows_use_the_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    user = {"role": "user", "content": "two plus two"}
    example = example_from_row(
        {
            "chosen": [user, {"role": "assistant", "content": "four"}],
            "rejected": [user, {"role": "assistant", "content": "five"}],
        },
        0,
    )
    (pair,), _ = tokenize_pairs(tokenizer, [example])
    assert tokenizer.decode(pair.prompt_ids).startswith("user: two plus two")
    assert "four" in tokenizer.decode(pair.chosen_ids) and "five" in tokenizer.decode(pair.rejected_ids)
