"""The on-policy pipeline: sample (resumable) → judge (math, reward model, llm over HTTP) → pairs → scenarios."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dpolab.data.formats import load_examples
from dpolab.data.onpolicy import best_and_worst, pairs_file, read_prompts, scenario_files
from dpolab.eval.judges import MATH_RUBRIC, LLMJudge, MathJudge, RewardModelJudge, parse_score
from dpolab.pipeline.judge import judge_file
from dpolab.pipeline.sample import sample_file
from tests.chat_server import ChatServer
from tests.tiny import save_tiny_model, tiny_tokenizer

PROMPTS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?", "answer": "#### 72"},
    {"question": "Weng earns 12 an hour. She worked 50 minutes. How much did she earn?", "answer": "#### 10"},
    {"question": "two plus two is", "answer": "#### 4"},
    {"question": "three times three is", "answer": "#### 9"},
    {"question": "The answer is", "answer": "#### 5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("policy") / "llama", seed=1)


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def sample(policy, prompts, out, **options):
    settings = dict(n=3, max_new_tokens=6, batch_size=2, prompt_field="question", reference_field="answer")
    return sample_file(policy, prompts, out, **{**settings, **options})


# --- sample ------------------------------------------------------------------------------------


def test_sample_writes_n_candidates_per_prompt_with_provenance(policy, prompts, tmp_path):
    result = sample(policy, prompts, tmp_path / "c.jsonl")
    assert result == {"prompts": 5, "sampled": 5, "resumed": 0, "empty_candidates": result["empty_candidates"]}
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(len(r["candidates"]) == 3 for r in rows)
    assert rows[0]["reference"] == "#### 72" and rows[0]["sampler"]["n"] == 3
    assert len({c for r in rows for c in r["candidates"]}) > 5  # sampled, not one greedy answer repeated


def test_an_interrupted_sample_resumes_to_the_uninterrupted_result(policy, prompts, tmp_path):
    sample(policy, prompts, tmp_path / "whole.jsonl")

    def stop_after_first_batch(total, done):
        def advance(k):
            raise KeyboardInterrupt

        return advance

    with pytest.raises(KeyboardInterrupt):
        sample(policy, prompts, tmp_path / "part.jsonl", progress=stop_after_first_batch)
    assert len((tmp_path / "part.jsonl").read_text().splitlines()) == 2
    with open(tmp_path / "part.jsonl", "a") as handle:  # a write torn by the interruption
        handle.write('{"prompt_id": 2, "prompt": "two plus')
    result = sample(policy, prompts, tmp_path / "part.jsonl")
    assert (result["sampled"], result["resumed"]) == (3, 2)
    assert (tmp_path / "part.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert sample(policy, prompts, tmp_path / "part.jsonl")["sampled"] == 0  # all done: nothing to do
    with pytest.raises(ValueError, match=r"prompt_id 0 was written with other settings \(n: 3 → 4\)"):
        sample(policy, prompts, tmp_path / "part.jsonl", n=4)
    assert sample(policy, prompts, tmp_path / "part.jsonl", n=4, restart=True)["sampled"] == 5


def test_sample_refuses_bad_prompt_rows_and_foreign_output_files(policy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok", "answer": "#### 1"}\n{"question": ""}\nnot json\n{"answer": "#### 3"}\n')
    with pytest.raises(ValueError) as error:
        read_prompts(bad, "question", "answer")
    message = str(error.value)
    assert "3 bad prompt rows" in message and "line 2 (row 1)" in message and "line 3 (row 2)" in message
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"something": 1}\n{"prompt_id": 0}\n')
    with pytest.raises(ValueError, match="line 1 is not a record"):
        sample(policy, write_jsonl(tmp_path / "p.jsonl", PROMPTS), foreign)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    from transformers import AutoTokenizer

    path = save_tiny_model(tmp_path_factory.mktemp("chat") / "llama", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_chat_template_sampling_and_conversational_pairs(chat_policy, policy, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.engine.generate import generate

    result = sample(chat_policy, prompts, tmp_path / "c.jsonl", chat_template=True, n=2)
    assert result["sampled"] == 5
    rows = judged_rows(tmp_path / "c.jsonl")
    assert rows[0]["sampler"]["chat_template"] is True and rows[0]["prompt"] == PROMPTS[0]["question"]
    # The candidates are what the model generates from the rendered prompt (no second BOS added).
    model, tokenizer = AutoModelForCausalLM.from_pretrained(chat_policy), AutoTokenizer.from_pretrained(chat_policy)
    rendered = [f"<|user|>{p['question']}<|assistant|>" for p in PROMPTS[:2]]
    again = generate(model, tokenizer, rendered, max_new_tokens=6, num_return_sequences=2, do_sample=True,
                     batch_size=2, seed=0, add_special_tokens=False)  # fmt: skip
    assert [r["candidates"] for r in rows[:2]] == again
    # Judged and paired, the pairs are conversational, so `dpolab train` renders the same template.
    for row in rows:
        row["candidates"] = ["#### 1", "#### 2"]
        row["reference"] = "#### 1"
    judge_file(write_jsonl(tmp_path / "c2.jsonl", rows), tmp_path / "j.jsonl", MathJudge())
    pairs_file(tmp_path / "j.jsonl", tmp_path / "pairs.jsonl")
    examples, bad = load_examples(str(tmp_path / "pairs.jsonl"))
    assert len(examples) == 5 and not bad and all(e.conversational for e in examples)
    assert examples[0].prompt == [{"role": "user", "content": PROMPTS[0]["question"]}]
    assert examples[0].chosen == [{"role": "assistant", "content": "#### 1"}]
    with pytest.raises(ValueError, match="chat template"):
        sample(policy, prompts, tmp_path / "x.jsonl", chat_template=True)


def test_message_list_prompts_are_accepted_and_named_when_malformed(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"role": "user"}]}, {"prompt": []}]
    with pytest.raises(ValueError) as error:
        read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert "2 bad prompt rows" in str(error.value) and "line 2 (row 1)" in str(error.value)
    assert read_prompts(write_jsonl(tmp_path / "ok.jsonl", rows[:1]))[0].prompt == rows[0]["prompt"]


# --- judges ------------------------------------------------------------------------------------


def judged_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_math_judge_scores_final_numbers_and_records_what_it_cannot_score(tmp_path):
    rows = [
        {
            "prompt_id": 0,
            "prompt": "q",
            "candidates": ["so #### 72", "#### 71", "", "no number"],
            "reference": "#### 72",
        },
        {"prompt_id": 1, "prompt": "q", "candidates": ["A: 10", "The answer: 1,0"], "reference": "10"},
    ]
    result = judge_file(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "j.jsonl", MathJudge())
    out = judged_rows(tmp_path / "j.jsonl")
    assert out[0]["scores"] == [1.0, 0.0, None, 0.0] and out[0]["notes"][2] == "empty generation"
    assert out[1]["scores"] == [1.0, 0.0]
    assert result["unscored"] == 1 and out[0]["judge"] == {"kind": "math", "checker": "math-verify"}
    with pytest.raises(ValueError, match=r"line 1 \(row 0\) \(prompt_id 7\).*needs a .reference."):
        judge_file(write_jsonl(tmp_path / "n.jsonl", [{"prompt_id": 7, "prompt": "q", "candidates": ["1"]}]),
                   tmp_path / "x.jsonl", MathJudge())  # fmt: skip


def test_reward_model_judge_scores_equal_the_model_on_each_text_alone(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    items = [
        ("two plus two is", " four", None),
        ("The answer is", " 72, because 48 + 24 = 72.", None),
        ("q", " ", None),
    ]
    verdicts = RewardModelJudge(str(tmp_path / "rm"), batch_size=2).score(items)
    for (prompt, candidate, _), verdict in zip(items[:2], verdicts, strict=False):
        # prompt + candidate + EOS, the text `dpolab rm` trains on, scored at its last token (the EOS)
        ids = torch.tensor([tokenizer(prompt + candidate + tokenizer.eos_token)["input_ids"]])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0, 0].item()
        assert verdict.score == pytest.approx(alone, abs=1e-5)
    assert verdicts[2].score is None and verdicts[2].note == "empty generation"
    # A chat prompt is scored on the reward model's own chat rendering of the conversation.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "rm")
    messages = [{"role": "user", "content": "two plus two is"}]
    (verdict,) = RewardModelJudge(str(tmp_path / "rm")).score([(messages, "four", None)])
    ids = torch.tensor(
        [tokenizer("<|user|>two plus two is<|assistant|>four<eos>", add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        assert verdict.score == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="num_labels = 1"):
        RewardModelJudge(str(tmp_path / "two"))


CANDIDATES = [{"prompt_id": 0, "prompt": "two plus two?", "reference": "#### 4",
               "candidates": ["2 + 2 = 4\n#### 4", "#### 5", "gibberish", ""]}]  # fmt: skip


def test_llm_judge_over_http_rubric_key_retries_and_parse_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_TEST_KEY", "sk-secret-123")
    server = ChatServer(fail_first=2)
    try:
        sleeps = []
        judge = LLMJudge(server.url, "judge-model", "DPOLAB_TEST_KEY", concurrency=1, sleep=sleeps.append)
        result = judge_file(write_jsonl(tmp_path / "c.jsonl", CANDIDATES), tmp_path / "j.jsonl", judge)
    finally:
        server.close()
    row = judged_rows(tmp_path / "j.jsonl")[0]
    assert row["scores"] == [5.0, 2.0, None, None]
    assert row["notes"][2].startswith("unparsable judge reply: 'I cannot decide.'")
    assert row["notes"][3] == "empty generation" and result["unscored"] == 2
    assert len(server.requests) == 3 + 2 and sleeps == [1.0, 2.0]  # two 503s retried with back-off; none for ""
    assert server.requests[-1]["messages"][0]["content"] == MATH_RUBRIC
    assert "Reference answer:\n#### 4" in server.requests[-1]["messages"][1]["content"]
    assert all(h["Authorization"] == "Bearer sk-secret-123" for h in server.headers)
    assert "sk-secret-123" not in (tmp_path / "j.jsonl").read_text()
    assert row["judge"]["api_key_env"] == "DPOLAB_TEST_KEY"


def test_llm_judge_gives_up_keeping_finished_prompts_and_stops_on_auth_errors(tmp_path):
    two = CANDIDATES + [{**CANDIDATES[0], "prompt_id": 1}]
    server = ChatServer(fail_after=3)  # the first prompt's three candidates are judged, then the endpoint dies
    try:
        judge = LLMJudge(server.url, "m", retries=2, concurrency=1, sleep=lambda s: None)
        with pytest.raises(RuntimeError, match="gave up after 3 attempts; last error: HTTP 503"):
            judge_file(write_jsonl(tmp_path / "c.jsonl", two), tmp_path / "j.jsonl", judge, batch_prompts=1)
        assert len(server.requests) == 3 + 3  # no request after giving up
    finally:
        server.close()
    assert [row["prompt_id"] for row in judged_rows(tmp_path / "j.jsonl")] == [0]  # kept
    server = ChatServer()
    try:
        result = judge_file(tmp_path / "c.jsonl", tmp_path / "j.jsonl", LLMJudge(server.url, "m"), batch_prompts=1)
    finally:
        server.close()
    assert (result["judged"], result["resumed"]) == (1, 1) and len(server.requests) == 3
    # Another judge model on the same file would mix two judges' scores: refused, naming the change.
    with pytest.raises(ValueError, match=r"prompt_id 0 was written with other settings \(model: 'm' → 'other'\)"):
        judge_file(tmp_path / "c.jsonl", tmp_path / "j.jsonl", LLMJudge("http://127.0.0.1:9/v1", "other"))
    server = ChatServer(fail_first=1, status=401)
    try:
        with pytest.raises(ValueError, match="HTTP 401.*is NO_SUCH_KEY set"):
            LLMJudge(server.url, "m", "NO_SUCH_KEY", concurrency=1).score([("q", "a", None)])
    finally:
        server.close()


class RedirectServer:
    """Answers every POST with a redirect to ``target`` (another origin: another port on 127.0.0.1)."""

    def __init__(self, target: str, code: int = 307) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(code)
                self.send_header("Location", target + "/chat/completions")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.mark.parametrize("code", [302, 303, 307, 308])
def test_llm_judge_never_sends_the_key_to_another_origin(tmp_path, monkeypatch, code):
    """A redirect to another origin is refused before anything is sent there (urllib would re-send Authorization)."""
    monkeypatch.setenv("DPOLAB_TEST_KEY", "sk-secret-123")
    elsewhere = ChatServer()
    redirecting = RedirectServer(elsewhere.url, code)
    try:
        judge = LLMJudge(redirecting.url, "m", "DPOLAB_TEST_KEY", concurrency=1, sleep=lambda s: None)
        with pytest.raises(ValueError, match="redirected .* to another origin"):
            judge.score([("two plus two?", "#### 4", "#### 4")])
    finally:
        redirecting.close()
        elsewhere.close()
    assert elsewhere.requests == [] and elsewhere.headers == []


def test_a_key_in_the_base_url_is_used_but_never_written(tmp_path):
    server = ChatServer()
    try:
        judge = LLMJudge(server.url + "?api-key=sk-in-the-query", "m", concurrency=1)
        judge_file(write_jsonl(tmp_path / "c.jsonl", CANDIDATES), tmp_path / "j.jsonl", judge)
    finally:
        server.close()
    assert len(server.requests) == 3  # the requests went out, to the URL as given
    written = (tmp_path / "j.jsonl").read_text()
    assert "sk-in-the-query" not in written and judged_rows(tmp_path / "j.jsonl")[0]["judge"]["url"].endswith(
        "/v1/chat/completions"
    )


@pytest.mark.parametrize(
    "reply, score",
    [
        ("Score: 4", 4),
        ("**Score:** 3", 3),
        ("I'd say 5", None),
        ("score = 2.", 2),
        ("Score: 7", None),
        ("Score: 1\n...Score: 5", 5),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


# --- pairs and scenarios -----------------------------------------------------------------------


def test_best_and_worst_ties_and_equal_scores():
    assert best_and_worst([0.5, 1.0, 1.0, 0.0, 0.0]) == (1, 3)
    assert best_and_worst([3.0, None, 3.0]) is None
    assert best_and_worst([None, 2.0]) is None
    assert best_and_worst([None, 2.0, 5.0]) == (2, 1)


def test_pairs_best_vs_worst_and_dropped_prompts_are_counted(tmp_path):
    rows = [
        {"prompt_id": 0, "prompt": "p0", "candidates": ["a", "b", "c"], "scores": [1.0, 0.0, 1.0]},
        {"prompt_id": 1, "prompt": "p1", "candidates": ["a", "b"], "scores": [1.0, 1.0]},
        {"prompt_id": 2, "prompt": "p2", "candidates": ["a", "b"], "scores": [None, 0.0]},
        {"prompt_id": 3, "prompt": "p3", "candidates": ["x", "y", "z"], "scores": [2.0, 5.0, 1.0]},
        # two samples alike, scored apart by a noisy judge: best and worst are the same text
        {"prompt_id": 4, "prompt": "p4", "candidates": ["same", "same"], "scores": [1.0, 0.0]},
        # the prompt of p0 again (a prompts file with a repeated row): the same pair again
        {"prompt_id": 5, "prompt": "p0", "candidates": ["a", "b"], "scores": [1.0, 0.0]},
    ]
    result = pairs_file(write_jsonl(tmp_path / "j.jsonl", rows), tmp_path / "pairs.jsonl")
    assert result["pairs"] == 2
    assert result["dropped"] == {
        "all candidates scored the same": [1],
        "fewer than two scored candidates": [2],
        "chosen and rejected are identical": [4],
        "the same prompt, chosen and rejected as an earlier pair": [5],
    }
    pairs = judged_rows(tmp_path / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b"), ("y", "z")]
    examples, bad = load_examples(str(tmp_path / "pairs.jsonl"))  # what dpolab train reads
    assert len(examples) == 2 and not bad
    # Bad input names the record and writes nothing.
    rows[3]["scores"] = [1.0, 0.0]
    with pytest.raises(ValueError, match=r"prompt_id 3: 2 scores for 3 candidates"):
        pairs_file(write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path / "bad_pairs.jsonl")
    with pytest.raises(ValueError, match=r"line 2 \(row 1\): missing 'scores'"):
        pairs_file(write_jsonl(tmp_path / "bad2.jsonl", [rows[0], {"prompt_id": 9, "prompt": "p", "candidates": []}]),
                   tmp_path / "bad_pairs.jsonl")  # fmt: skip
    assert not (tmp_path / "bad_pairs.jsonl").exists()


def test_four_scenarios_from_two_pools(tmp_path):
    policy = [
        {"prompt_id": 0, "prompt": "p0", "reference": "R0", "candidates": ["good", "bad"], "scores": [1.0, 0.0]},
        {"prompt_id": 1, "prompt": "p1", "reference": "R1", "candidates": ["good", "good2"], "scores": [1.0, 1.0]},
        {"prompt_id": 2, "prompt": "p2", "reference": "R2", "candidates": ["bad", "bad2"], "scores": [0.0, 0.0]},
    ]
    other = [
        {"prompt_id": 0, "prompt": "p0", "candidates": ["o-bad"], "scores": [0.0]},
        {"prompt_id": 1, "prompt": "p1", "candidates": ["o-bad"], "scores": [0.0]},
        {"prompt_id": 2, "prompt": "p2", "candidates": ["o-good"], "scores": [1.0]},
    ]
    summary = scenario_files(
        write_jsonl(tmp_path / "p.jsonl", policy), write_jsonl(tmp_path / "o.jsonl", other), tmp_path / "out"
    )
    sizes = {n: s["pairs"] for n, s in summary["scenarios"].items()}
    assert sizes == {1: 1, 2: 2, 3: 2, 4: 2}
    s2 = judged_rows(tmp_path / "out" / "scenario2.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in s2] == [("R0", "bad"), ("R2", "bad")]
    s3 = judged_rows(tmp_path / "out" / "scenario3.jsonl")
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in s3] == [(0, "good", "o-bad"), (1, "good", "o-bad")]
    assert summary["scenarios"][1]["dropped"] == {"no good chosen": 1, "no bad rejected": 1,
                                                  "prompt missing from a pool": 0}  # fmt: skip
    # Only prompt 0 has a pair in all four scenarios (1 lacks a bad policy candidate, 2 a good one)
    same = scenario_files(tmp_path / "p.jsonl", tmp_path / "o.jsonl", tmp_path / "same", same_prompts=True)
    assert {n: s["pairs"] for n, s in same["scenarios"].items()} == {1: 1, 2: 1, 3: 1, 4: 1}
    assert {n: s["dropped"]["not in every scenario"] for n, s in same["scenarios"].items()} == {1: 0, 2: 1, 3: 1, 4: 1}
    for number in (1, 2, 3, 4):
        assert [p["prompt_id"] for p in judged_rows(tmp_path / "same" / f"scenario{number}.jsonl")] == [0]
    other[0]["prompt"] = "different"
    with pytest.raises(ValueError, match="prompt_id 0: the two pools hold different prompts"):
        scenario_files(tmp_path / "p.jsonl", write_jsonl(tmp_path / "o.jsonl", other), tmp_path / "out")


def test_cli_sample_judge_pairs_on_synthetic_problems(policy, tmp_path):
    from dpolab.data.synthetic import make_problems

    problems = [{"prompt": p.question + "\n", "answer": p.answer} for p in make_problems(6, seed=0)]
    write_jsonl(tmp_path / "prompts.jsonl", problems)
    run = lambda *args: subprocess.run([sys.executable, "-m", "dpolab", "data", *args],  # noqa: E731
                                       capture_output=True, text=True)  # fmt: skip
    sampled = run("sample", str(tmp_path / "prompts.jsonl"), "--model", policy, "--out", str(tmp_path / "c.jsonl"),
                  "--n", "4", "--max-new-tokens", "5", "--reference-field", "answer", "--no-progress")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert "6 prompts: sampled 6 now, 0 already in" in sampled.stdout
    # The random model never states a final number: every candidate is wrong, so no pair has a winner.
    judged = run("judge", str(tmp_path / "c.jsonl"), "--judge", "math", "--out", str(tmp_path / "j.jsonl"),
                 "--no-progress")  # fmt: skip
    assert judged.returncode == 0, judged.stderr
    paired = run("pairs", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "pairs.jsonl"))
    # no pair to train on is an error, and no empty file is left for training to fail on later
    assert paired.returncode == 2 and "no pair to write (6 prompts: 6 all candidates scored the same)" in paired.stderr
    assert not (tmp_path / "pairs.jsonl").exists()
    # Every candidate is wrong and the references are right: only the reference-chosen scenarios have pairs.
    scenario = run("scenario", "--policy", str(tmp_path / "j.jsonl"), "--other", str(tmp_path / "j.jsonl"),
                   "--out", str(tmp_path / "scen"), "--good-score", "1")  # fmt: skip
    assert scenario.returncode == 0, scenario.stderr
    assert "scenario 1 (chosen: policy, rejected: policy): 0 pairs (6 no good chosen)" in scenario.stdout
    assert "scenario 2 (chosen: reference, rejected: policy): 6 pairs (none dropped)" in scenario.stdout
    missing = run("judge", str(tmp_path / "c.jsonl"), "--judge", "llm", "--out", str(tmp_path / "x.jsonl"))
    assert missing.returncode == 2 and "--base-url" in missing.stderr
    no_model = run("judge", str(tmp_path / "c.jsonl"), "--judge", "reward-model", "--out", str(tmp_path / "x.jsonl"))
    assert no_model.returncode == 2 and "needs --model" in no_model.stderr


from tests.paths import DATA as SHARED  # noqa: E402


def test_generic_scenarios_on_gsm8k_pools_agree_with_the_gsm8k_builder(tmp_path):
    """The GSM8K model solutions as two judged pools (6B = policy, 175B = other) give the same pairs as
    `dpolab data gsm8k-scenarios` on every question whose solutions all state a final number. The math
    judge scores a solution without one as wrong (0); the GSM8K builder leaves it out."""
    from dpolab.data.scenarios import gsm8k_scenarios
    from dpolab.data.synthetic import final_answer

    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "model_solutions.jsonl").read_text().splitlines()]
    solvers = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    unparsable = {r["question"] + "\n" for r in rows if any(final_answer(r[s]["solution"]) is None for s in solvers)}
    assert 0 < len(unparsable) < 20
    for model in ("6b", "175b"):
        write_jsonl(
            tmp_path / f"{model}.jsonl",
            [
                {"prompt_id": i, "prompt": r["question"] + "\n", "reference": r["ground_truth"],
                 "candidates": [r[f"{model}_finetuning"]["solution"], r[f"{model}_verification"]["solution"]]}
                for i, r in enumerate(rows)
            ],
        )  # fmt: skip
        judge_file(tmp_path / f"{model}.jsonl", tmp_path / f"{model}.judged.jsonl", MathJudge())
    summary = scenario_files(tmp_path / "6b.judged.jsonl", tmp_path / "175b.judged.jsonl", tmp_path / "out")
    expected, _ = gsm8k_scenarios(rows)
    for number in (1, 2, 3, 4):
        ours = [
            (p["prompt"], p["chosen"], p["rejected"]) for p in judged_rows(tmp_path / "out" / f"scenario{number}.jsonl")
        ]
        theirs = [(p["prompt"], p["chosen"], p["rejected"]) for p in expected[number]]
        assert [t for t in ours if t[0] not in unparsable] == [t for t in theirs if t[0] not in unparsable]
        assert summary["scenarios"][number]["pairs"] == len(ours)
        assert abs(len(ours) - len(theirs)) <= len(unparsable)
    # The counts from the data's own is_correct labels, by the rule "a prompt gives a pair when the chosen side
    # has a right solution (the reference always is) and the rejected side a wrong one"; the judge and the
    # labels may differ only on the solutions without a final number.
    right = {
        m: [[r[f"{m}_{k}"]["is_correct"] for k in ("finetuning", "verification")] for r in rows] for m in ("6b", "175b")
    }
    has = {"policy": right["6b"], "other": right["175b"]}
    for number, (chosen_from, rejected_from) in {1: ("policy", "policy"), 2: ("reference", "policy"),
                                                 3: ("policy", "other"), 4: ("reference", "other")}.items():  # fmt: skip
        labelled = sum(
            (chosen_from == "reference" or any(has[chosen_from][i])) and not all(has[rejected_from][i])
            for i in range(len(rows))
        )
        assert abs(summary["scenarios"][number]["pairs"] - labelled) <= len(unparsable), number
