"""Tokenisation equals TRL 1.16's prepared data set; truncation, prompt cuts and drops are counted."""

from __future__ import annotations

import json
import warnings

import pytest
import trl
from datasets import Dataset

from dpolab.data.formats import example_from_row, load_examples, sft_example_from_row
from dpolab.data.tokenize import tokenize_pairs, tokenize_sft
from dpolab.train.config import load_config
from tests.paths import DATA as SHARED  # noqa: E402
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
    """truncation_mode drop is the behaviour before the option: a prompt that alone reaches max_length drops the pair."""
    tokenizer = tiny_tokenizer()
    long_prompt = "Natalia sold clips to 48 of her friends in April " * 4
    examples = [
        example_from_row(
            {"prompt": "Q", "chosen": " two plus two is four and three times three is nine", "rejected": " no"}, 0
        ),
        example_from_row({"prompt": long_prompt, "chosen": " yes", "rejected": " no"}, 1),
        example_from_row({"prompt": "Q", "chosen": " yes", "rejected": " no"}, 2),
    ]
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=8, truncation_mode="drop")
    assert [p.row for p in pairs] == [0, 2]
    assert report.truncated_rows == [0] and report.dropped_rows == [1]
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 8 for p in pairs)
    text = "\n".join(report.lines())
    assert "1 pairs had a completion truncated" in text and "1 pairs dropped" in text and "rows 1" in text
    assert "max_length=8 tokens (truncation_mode drop)" in text
    assert report.as_dict()["pairs_dropped_by_reason"] == {"prompt_reaches_max_length": 1}


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


# --- prompt truncation: max_prompt_length and truncation_mode ------------------------------------

LONG_PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 3


def bos_tokenizer():
    """The tiny tokenizer, adding a ``<bos>`` token in front of every text (as Llama's does)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
    )
    return tokenizer


def long_pair(row=0, chosen=" yes", rejected=" no"):
    return example_from_row({"prompt": LONG_PROMPT + "Q:", "chosen": chosen, "rejected": rejected}, row)


def untruncated(tokenizer, example):
    (pair,), _ = tokenize_pairs(tokenizer, [example], max_length=None)
    return list(pair.prompt_ids), pair


def test_keep_end_keeps_the_last_prompt_tokens_and_the_bos():
    tokenizer = bos_tokenizer()
    full, whole = untruncated(tokenizer, long_pair())
    assert full[0] == tokenizer.bos_token_id and len(full) > 40
    longest = max(len(whole.chosen_ids), len(whole.rejected_ids))
    assert longest < 8  # fits in half of max_length: the prompt yields max_length - longest tokens
    (pair,), report = tokenize_pairs(tokenizer, [long_pair()], max_length=16)  # keep_end is the default
    keep = 16 - longest
    assert list(pair.prompt_ids) == [tokenizer.bos_token_id] + full[-(keep - 1) :]
    assert (pair.chosen_ids, pair.rejected_ids) == (whole.chosen_ids, whole.rejected_ids)  # completions whole
    assert tokenizer.decode(pair.prompt_ids).endswith("in May. Q:")
    assert report.prompt_cut_rows == [0] and report.prompt_tokens_cut == len(full) - keep
    assert report.dropped_rows == [] and report.truncated_rows == [] and report.kept == 1
    text = "\n".join(report.lines())
    assert "1 pairs had the prompt cut to fit max_length=16 tokens (truncation_mode keep_end: its first tokens" in text
    assert f"{len(full) - keep} prompt tokens removed in all" in text
    assert report.as_dict()["prompts_cut"] == 1 and report.as_dict()["truncation_mode"] == "keep_end"


def test_keep_start_keeps_the_first_prompt_tokens():
    tokenizer = bos_tokenizer()
    full, whole = untruncated(tokenizer, long_pair())
    (pair,), report = tokenize_pairs(tokenizer, [long_pair()], max_length=16, truncation_mode="keep_start")
    keep = 16 - max(len(whole.chosen_ids), len(whole.rejected_ids))
    assert list(pair.prompt_ids) == full[:keep] and pair.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(pair.prompt_ids[1:]).startswith("Natalia sold clips")
    assert report.prompt_cut_rows == [0] and "truncation_mode keep_start: its last tokens removed" in report.lines()[1]


def test_a_long_completion_keeps_half_of_max_length_and_a_prompt_with_room_is_not_cut():
    tokenizer = tiny_tokenizer()
    completion = " two plus two is four and three times three is nine" * 3
    examples = [
        long_pair(0, chosen=completion),
        example_from_row({"prompt": "Natalia sold clips to 48", "chosen": completion, "rejected": " no"}, 1),
    ]
    full, _ = untruncated(tokenizer, examples[1])
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=20)
    assert [len(p.prompt_ids) for p in pairs] == [10, len(full)]  # the long prompt yields down to 20 // 2
    assert [len(p.chosen_ids) for p in pairs] == [10, 20 - len(full)]  # completions cut at the end, as before
    assert report.prompt_cut_rows == [0] and report.truncated_rows == [0, 1]


def test_drop_mode_and_max_prompt_length():
    tokenizer = bos_tokenizer()
    full, whole = untruncated(tokenizer, long_pair())
    short = example_from_row({"prompt": "Q", "chosen": " two plus two is four", "rejected": " no"}, 1)
    examples = [long_pair(0), short]
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=64, max_prompt_length=12)
    assert list(pairs[0].prompt_ids) == [tokenizer.bos_token_id] + full[-11:]
    assert pairs[0].chosen_ids == whole.chosen_ids and len(pairs[1].prompt_ids) < 12  # a short prompt: untouched
    assert report.prompt_cut_rows == [0] and report.prompt_tokens_cut == len(full) - 12
    assert "prompt cut to max_prompt_length=12 tokens" in report.lines()[1]
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=64, max_prompt_length=12, truncation_mode="drop")
    assert [p.row for p in pairs] == [1] and report.prompt_cut_rows == []
    assert report.dropped_by == {"prompt_over_max_prompt_length": [0]}
    assert report.lines()[1] == (
        "1 pairs dropped: the prompt is longer than max_prompt_length=12 tokens (truncation_mode drop) (rows 0)"
    )
    # With max_prompt_length, the completion gets the rest of max_length.
    completion = " two plus two is four and three times three is nine" * 3
    (pair,), report = tokenize_pairs(tokenizer, [long_pair(chosen=completion)], max_length=20, max_prompt_length=12)
    assert (len(pair.prompt_ids), len(pair.chosen_ids)) == (12, 8) and report.truncated_rows == [0]


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"truncation_mode": "middle"}, "truncation_mode: must be one of keep_end, keep_start, drop"),
        ({"max_prompt_length": 16}, "max_prompt_length: must be smaller than max_length (16)"),
        ({"max_prompt_length": 0}, "max_prompt_length: must be a positive integer"),
    ],
)
def test_invalid_truncation_settings_name_the_key(limits, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tokenize_pairs(tiny_tokenizer(), [long_pair()], max_length=16, **limits)


def test_conversational_prompts_are_cut_on_tokens_after_the_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    turns = [{"role": "user", "content": LONG_PROMPT}, {"role": "assistant", "content": "ok"}] * 2
    turns.append({"role": "user", "content": "two plus two"})
    example = example_from_row(
        {
            "chosen": [*turns, {"role": "assistant", "content": "four"}],
            "rejected": [*turns, {"role": "assistant", "content": "five"}],
        },
        0,
    )
    (whole,), _ = tokenize_pairs(tokenizer, [example], max_length=None)
    (pair,), report = tokenize_pairs(tokenizer, [example], max_length=24)
    keep = 24 - max(len(whole.chosen_ids), len(whole.rejected_ids))
    assert pair.prompt_ids == whole.prompt_ids[-keep:] and report.prompt_cut_rows == [0]
    assert tokenizer.decode(pair.prompt_ids).endswith("user: two plus two\nassistant:")


def test_sft_examples_get_the_same_options():
    tokenizer = bos_tokenizer()
    examples = [
        sft_example_from_row({"prompt": LONG_PROMPT + "Q:", "completion": " yes"}, 0),
        sft_example_from_row({"prompt": "Q", "completion": " no"}, 1),
    ]
    (whole, _), _ = tokenize_sft(tokenizer, examples, max_length=None)
    items, report = tokenize_sft(tokenizer, examples, max_length=16)
    keep = 16 - len(whole.completion_ids)
    assert list(items[0].prompt_ids) == [tokenizer.bos_token_id, *whole.prompt_ids[-(keep - 1) :]]
    assert report.prompt_cut_rows == [0] and "1 examples had the prompt cut" in report.lines()[1]
    items, report = tokenize_sft(tokenizer, examples, max_length=64, max_prompt_length=8, truncation_mode="keep_start")
    assert items[0].prompt_ids == whole.prompt_ids[:8] and report.prompt_cut_rows == [0]
    items, report = tokenize_sft(tokenizer, examples, max_length=16, truncation_mode="drop")
    assert [i.row for i in items] == [1] and report.dropped_by == {"prompt_reaches_max_length": [0]}
    assert "1 examples dropped: the prompt alone reaches max_length=16 tokens" in report.lines()[1]


def test_hh_rlhf_long_dialogues_keep_their_end_instead_of_being_dropped(tmp_path):
    """The issue's case: HH-RLHF with max_length 256 lost pairs whose prompt alone was too long."""
    lines = (SHARED / "hh-rlhf" / "harmless_base_test_part.jsonl").read_text().splitlines()[:300]
    (tmp_path / "hh.jsonl").write_text("\n".join(lines) + "\n")
    examples, bad = load_examples(str(tmp_path / "hh.jsonl"), on_bad_rows="skip")
    tokenizer = tiny_tokenizer()
    _, before = tokenize_pairs(tokenizer, examples, max_length=256, truncation_mode="drop")
    assert len(before.dropped_by["prompt_reaches_max_length"]) > 50  # the old behaviour: many pairs lost
    pairs, after = tokenize_pairs(tokenizer, examples, max_length=256)
    assert after.dropped_rows == [] and after.kept == len(examples)
    assert set(before.dropped_rows) <= set(after.prompt_cut_rows)  # each is now kept, its prompt cut
    for pair in pairs:
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 256
    cut = next(p for p in pairs if p.row == before.dropped_rows[0])
    assert tokenizer.decode(cut.prompt_ids).endswith("\n\nAssistant:")  # the dialogue's end is kept


def test_config_names_the_truncation_keys(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": " yes", "rejected": " no"}) + "\n")
    base = ["--model", "tiny-model", "--data", str(data), "--output_dir", str(tmp_path / "out")]
    config = load_config(None, [*base, "--max_length", "256", "--max_prompt_length", "128"])
    assert (config.max_prompt_length, config.truncation_mode) == (128, "keep_end")
    for flags, message in [
        (["--truncation_mode", "middle"], "truncation_mode: must be one of keep_end, keep_start, drop; got 'middle'"),
        (["--max_length", "256", "--max_prompt_length", "256"], "max_prompt_length: must be smaller than max_length"),
        (["--max_prompt_length", "0"], "max_prompt_length: must be > 0 or null; got 0"),
        (["--max_prompt_length", "1.5"], "max_prompt_length: expected int or null"),
    ]:
        with pytest.raises(ValueError) as error:
            load_config(None, base + flags)
        assert message in str(error.value)


def test_truncation_settings_reach_the_reference_cache_key_through_the_items():
    """The cache key and the resume data check hash the tokenised items: a setting that changes them changes both."""
    from dpolab.engine.reference import items_fingerprint

    tokenizer = bos_tokenizer()
    examples = [long_pair(0), example_from_row({"prompt": "Q", "chosen": " yes", "rejected": " no"}, 1)]

    def fingerprint(**limits):
        return items_fingerprint(tokenize_pairs(tokenizer, examples, max_length=16, **limits)[0])

    keys = {mode: fingerprint(truncation_mode=mode) for mode in ("keep_end", "keep_start", "drop")}
    keys["max_prompt_length"] = fingerprint(max_prompt_length=8)
    assert len(set(keys.values())) == 4
    short = examples[1:]  # nothing to cut: the same items, the same key (and the cache is rightly reused)
    modes = ("keep_end", "keep_start", "drop")
    assert len({items_fingerprint(tokenize_pairs(tokenizer, short, 16, truncation_mode=m)[0]) for m in modes}) == 1
