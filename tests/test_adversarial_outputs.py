"""Issue 30, item 1: every command that writes refuses an output that is, holds or sits inside one of its
inputs, or that lands inside a dpolab run folder it does not belong to; nothing it reads changes by a byte.

Each case runs the real command line in-process (``dpolab.cli.main``) and compares every file of the
workspace (the inputs and a finished training run) before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dpolab.cli import main
from tests.paths import GSM8K_SOLUTIONS, GSM8K_TRAIN
from tests.tiny import save_tiny_model

PAIRS = [{"prompt": f"Q: {a} plus {a}? A:", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}"} for a in range(6)]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The inputs of every command, and a finished training run (``run``)."""
    root = tmp_path_factory.mktemp("outputs")
    save_tiny_model(root / "model", seed=0)
    jsonl(root / "pairs.jsonl", PAIRS)
    jsonl(root / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS])
    jsonl(root / "prompts.jsonl", [{"prompt": p["prompt"], "answer": p["chosen"].strip()} for p in PAIRS])
    (root / "gsm8k.jsonl").write_text("".join(GSM8K_TRAIN.read_text().splitlines(keepends=True)[:8]))
    (root / "solutions.jsonl").write_text("".join(GSM8K_SOLUTIONS.read_text().splitlines(keepends=True)[:8]))
    arc = {"question": "2 + 2?", "choices": {"text": ["3", "4", "5"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    jsonl(root / "arc.jsonl", [arc, {**arc, "question": "1 + 1?", "answerKey": "A"}])
    judged = [{"prompt_id": i, "prompt": f"p{i}", "candidates": ["a", "b"], "scores": [1.0, 0.0]} for i in range(3)]
    jsonl(root / "judged.jsonl", judged)
    jsonl(root / "judged2.jsonl", [{**row, "scores": [0.0, 1.0]} for row in judged])
    (root / "scenario.yaml").write_text("chosen: 0.5\nrejected_each: 0.1\n")
    (root / "spec.yaml").write_text("recipe: toy\ngrid: {loss: [dpo]}\nbase: {steps: 5}\nseeds: [0]\n")
    (root / "pool").mkdir()
    jsonl(root / "pool" / "judged.jsonl", judged)
    # a reward model inside a folder a run could be pointed at; a LoRA adapter whose base sits in another
    shutil.copytree(root / "model", root / "rm-holder" / "model")
    shutil.copytree(root / "model", root / "base-holder" / "model")
    save_tiny_adapter(root / "base-holder" / "model", root / "adapter")
    # a sweep whose baseline model lies inside the folder it is asked to write
    shutil.copytree(root / "model", root / "sweep-holder" / "model")
    (root / "baseline-spec.yaml").write_text(
        f"recipe: toy\ngrid: {{loss: [dpo]}}\nbase: {{steps: 5}}\nseeds: [0]\n"
        f"baseline: {{model: {root / 'sweep-holder' / 'model'}}}\n"
        "evaluate: {command: python -c pass, output: e.json}\n"
    )
    # a config written by hand into the folder it names as output_dir
    (root / "cfg").mkdir()
    (root / "cfg" / "config.yaml").write_text(
        f"# my settings\nmodel: {root / 'model'}\ndata: {root / 'pairs.jsonl'}\noutput_dir: {root / 'cfg'}\n"
    )
    # folders that hold someone's files of the names a command writes
    shutil.copytree(root / "model", root / "model-copy")
    (root / "proj").mkdir()
    (root / "proj" / "utils.py").write_text("# mine\n")
    (root / "proj" / "notes.txt").write_text("mine\n")
    # from the third trial: folders holding only files of the names a command writes, and a linked checkpoints
    (root / "mine").mkdir()
    (root / "mine" / "summary.json").write_text('{"my": "precious results"}')
    shutil.copytree(root / "model", root / "my-models" / "model")
    (root / "elsewhere").mkdir()
    (root / "linked-run").mkdir()
    (root / "linked-run" / "checkpoints").symlink_to(root / "elsewhere")
    for name, output in (("abs", str(root / "spec.yaml")), ("own", "summary.json")):
        (root / f"eval-{name}.yaml").write_text(
            f"recipe: toy\ngrid: {{loss: [dpo]}}\nbase: {{steps: 3}}\nseeds: [0]\n"
            f"evaluate: {{command: python -c pass, output: {output}, baseline: false}}\n"
        )
    words = ["train", "--model", root / "model", "--data", root / "pairs.jsonl", "--output_dir", root / "run"]
    words += ["--max_steps", "1", "--batch_size", "2", "--progress", "false", "--tensorboard", "false"]
    assert main([*map(str, words), "--cache_dir", str(root / "cache")]) == 0
    return root


def save_tiny_adapter(base: Path, out: Path) -> None:
    """A LoRA adapter on ``base``, saved by peft (its adapter_config.json names ``base``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(out)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the run's lock file aside: its content is the last pid) by content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def training(command: str, data: str, out: str) -> list[str]:
    return [command, "--model", "{model}", "--data", data, "--output_dir", out, "--max_steps", "1",
            "--progress", "false", "--tensorboard", "false", "--cache_dir", "{root}/cache2"]  # fmt: skip


# (case id, command line with {root}/{model}/{run} placeholders, what the error must say)
CASES = [
    (
        "corrupt-math out=input",
        ["data", "corrupt-math", "{root}/gsm8k.jsonl", "--out", "{root}/gsm8k.jsonl"],
        "is the input file",
    ),
    (
        "corrupt-math into run",
        ["data", "corrupt-math", "{root}/gsm8k.jsonl", "--out", "{run}/pairs.jsonl"],
        "inside the training run folder",
    ),
    (
        "edit-stats out=input",
        ["data", "edit-stats", "{root}/pairs.jsonl", "--out", "{root}/pairs.jsonl"],
        "is the input file",
    ),
    ("edit-stats out=run", ["data", "edit-stats", "{root}/pairs.jsonl", "--out", "{run}"], "is a training run folder"),
    (
        "edit-stats out holds input",
        ["data", "edit-stats", "{root}/pairs.jsonl", "--out", "{root}"],
        "contains the input file",
    ),
    (
        "from-choices out=input",
        ["data", "from-choices", "{root}/arc.jsonl", "--schema", "arc", "--out", "{root}/arc.jsonl"],
        "is the input file",
    ),
    (
        "from-choices into run",
        ["data", "from-choices", "{root}/arc.jsonl", "--schema", "arc", "--out", "{run}/model/x.jsonl"],
        "inside the training run folder",
    ),
    (
        "gsm8k-scenarios out holds input",
        ["data", "gsm8k-scenarios", "{root}/solutions.jsonl", "--out", "{root}"],
        "contains the input file",
    ),
    (
        "gsm8k-scenarios out=run",
        ["data", "gsm8k-scenarios", "{root}/solutions.jsonl", "--out", "{run}"],
        "is a training run folder",
    ),
    (
        "sample out=prompts",
        [
            "data",
            "sample",
            "{root}/prompts.jsonl",
            "--model",
            "{model}",
            "--out",
            "{root}/prompts.jsonl",
            "--no-progress",
        ],
        "is the prompts file",
    ),
    (
        "sample out in model",
        ["data", "sample", "{root}/prompts.jsonl", "--model", "{model}", "--out", "{model}/c.jsonl", "--no-progress"],
        "is inside the model",
    ),
    (
        "sample restart into run",
        ["data", "sample", "{root}/prompts.jsonl", "--model", "{model}", "--out", "{run}/metrics.jsonl", "--restart"],
        "inside the training run folder",
    ),
    (
        "judge out=input",
        ["data", "judge", "{root}/judged.jsonl", "--judge", "math", "--out", "{root}/judged.jsonl"],
        "is the input file",
    ),
    (
        "judge into run",
        ["data", "judge", "{root}/judged.jsonl", "--judge", "math", "--out", "{run}/summary.json", "--restart"],
        "inside the training run folder",
    ),
    (
        "agreement out=input",
        ["data", "agreement", "{root}/judged.jsonl", "{root}/judged2.jsonl", "--out", "{root}/judged2.jsonl"],
        "is the second file",
    ),
    (
        "agreement over run file",
        ["data", "agreement", "{root}/judged.jsonl", "{root}/judged2.jsonl", "--out", "{run}/summary.json"],
        "which the training run",
    ),
    ("pairs out=input", ["data", "pairs", "{root}/judged.jsonl", "--out", "{root}/judged.jsonl"], "is the input file"),
    (
        "pairs into run",
        ["data", "pairs", "{root}/judged.jsonl", "--out", "{run}/data.jsonl"],
        "inside the training run folder",
    ),
    (
        "scenario out holds input",
        [
            "data",
            "scenario",
            "--policy",
            "{root}/pool/judged.jsonl",
            "--other",
            "{root}/judged2.jsonl",
            "--out",
            "{root}/pool",
        ],
        "contains the policy file",
    ),
    (
        "scenario out=run",
        ["data", "scenario", "--policy", "{root}/judged.jsonl", "--other", "{root}/judged2.jsonl", "--out", "{run}"],
        "is a training run folder",
    ),
    (
        "eval math out=data",
        ["eval", "math", "{root}/gsm8k.jsonl", "--model", "{model}", "--out", "{root}/gsm8k.jsonl"],
        "is the data",
    ),
    (
        "eval math over run file",
        ["eval", "math", "{root}/gsm8k.jsonl", "--model", "{model}", "--out", "{run}/summary.json"],
        "which the training run",
    ),
    (
        "eval harness out=data",
        [
            "eval",
            "harness",
            "--model",
            "{model}",
            "--tasks",
            "gsm8k",
            "--data",
            "gsm8k={root}/gsm8k.jsonl",
            "--out",
            "{root}/gsm8k.jsonl",
        ],
        "is the gsm8k data",
    ),
    (
        "eval harness task-dir=model",
        [
            "eval",
            "harness",
            "--model",
            "{model}",
            "--tasks",
            "gsm8k",
            "--data",
            "gsm8k={root}/gsm8k.jsonl",
            "--task-dir",
            "{model}",
        ],
        "is the model",
    ),
    (
        "eval contamination out=data",
        [
            "eval",
            "contamination",
            "--model",
            "{model}",
            "--data",
            "{root}/gsm8k.jsonl",
            "--fields",
            "question",
            "--out",
            "{root}/gsm8k.jsonl",
        ],
        "is the data",
    ),
    (
        "eval tokens out=data",
        ["eval", "tokens", "{root}/pairs.jsonl", "--model", "{model}", "--out", "{root}/pairs.jsonl"],
        "is the data",
    ),
    (
        "eval tokens tokens in model",
        ["eval", "tokens", "{root}/pairs.jsonl", "--model", "{model}", "--tokens", "{model}/t.jsonl"],
        "is inside the model",
    ),
    (
        "eval tokens plot over run file",
        ["eval", "tokens", "{root}/pairs.jsonl", "--model", "{model}", "--plot", "{run}/config.yaml"],
        "which the training run",
    ),
    (
        "eval tokens out=tokens",
        [
            "eval",
            "tokens",
            "{root}/pairs.jsonl",
            "--model",
            "{model}",
            "--out",
            "{root}/o.json",
            "--tokens",
            "{root}/o.json",
        ],
        "are the same file",
    ),
    (
        "report out=run file",
        ["report", "{run}", "--out", "{run}/metrics.jsonl"],
        "metrics.jsonl, which the training run",
    ),
    ("report out=run", ["report", "{run}", "--out", "{run}"], "is a folder"),
    ("sweep out=spec", ["sweep", "{root}/spec.yaml", "--out", "{root}/spec.yaml", "--no-progress"], "is the spec"),
    ("sweep out=run", ["sweep", "{root}/spec.yaml", "--out", "{run}", "--no-progress"], "is a training run folder"),
    (
        "toy run out=scenario",
        ["toy", "run", "--scenario", "{root}/scenario.yaml", "--steps", "2", "--out", "{root}/scenario.yaml"],
        "is the scenario file",
    ),
    ("toy run out=run", ["toy", "run", "--steps", "2", "--out", "{run}"], "is a training run folder"),
    (
        "toy figures out holds scenario",
        ["toy", "figures", "--scenario", "{root}/scenario.yaml", "--steps", "2", "--out", "{root}"],
        "contains the scenario file",
    ),
    ("quickstart out=run", ["quickstart", "--size", "small", "--out", "{run}"], "is a training run folder"),
    ("quickstart out in run", ["quickstart", "--size", "small", "--out", "{run}/qs"], "inside the training run folder"),
    ("train output_dir=model", training("train", "{root}/pairs.jsonl", "{model}"), "is the model"),
    ("train output_dir=data", training("train", "{root}/pairs.jsonl", "{root}/pairs.jsonl"), "pairs.jsonl is a file"),
    (
        "train output_dir in run",
        training("train", "{root}/pairs.jsonl", "{run}/model"),
        "which the training run",
    ),
    ("sft output_dir=data", training("sft", "{root}/sft.jsonl", "{root}/sft.jsonl"), "sft.jsonl is a file"),
    ("rm output_dir holds data", training("rm", "{root}/pairs.jsonl", "{root}"), "contains the model"),
    (
        "ppo output_dir=run checkpoints",
        training("ppo", "{root}/prompts.jsonl", "{run}/checkpoints"),
        "which the training run",
    ),
    # from the second trial: inputs named in nested settings, adapters' bases, folders holding someone's files
    ("ppo output_dir holds the reward model",
     [*training("ppo", "{root}/prompts.jsonl", "{root}/rm-holder"), "--ppo.reward.model", "{root}/rm-holder/model",
      "--overwrite"], "contains the ppo.reward.model"),
    ("train output_dir holds the adapter's base",
     [*training("train", "{root}/pairs.jsonl", "{root}/base-holder"), "--model", "{root}/adapter", "--overwrite"],
     "contains the base model of the model"),
    ("eval out inside the adapter's base",
     ["eval", "math", "{root}/gsm8k.jsonl", "--model", "{root}/adapter", "--out", "{root}/base-holder/model/config.json"],
     "is inside the base model of the model"),
    ("sweep out holds the baseline model", ["sweep", "{root}/baseline-spec.yaml", "--out", "{root}/sweep-holder"],
     "contains the baseline.model"),
    ("config written by hand in output_dir", ["train", "{root}/cfg/config.yaml", "--max_steps", "1"],
     "holds files this command did not write, and it would replace its config.yaml"),
    ("toy run into a model folder", ["toy", "run", "--steps", "2", "--out", "{root}/model-copy"],
     "would replace its config.json"),
    ("harness task-dir over someone's utils.py",
     ["eval", "harness", "--model", "{model}", "--tasks", "gsm8k", "--data", "gsm8k={root}/gsm8k.jsonl",
      "--task-dir", "{root}/proj"], "would replace its utils.py"),
    ("edit-stats over a lone summary.json", ["data", "edit-stats", "{root}/pairs.jsonl", "--out", "{root}/mine"],
     "holds files this command did not write, and it would replace its summary.json"),
    ("toy run over a lone summary.json", ["toy", "run", "--steps", "2", "--out", "{root}/mine"],
     "would replace its summary.json"),
    ("train into a folder holding only someone's model", training("train", "{root}/pairs.jsonl", "{root}/my-models"),
     "would replace its model"),
    ("train with linked checkpoints", training("train", "{root}/pairs.jsonl", "{root}/linked-run"),
     "checkpoints is a symbolic link"),
    ("sweep evaluation writing outside its run", ["sweep", "{root}/eval-abs.yaml", "--out", "{root}/sw1"],
     "a file name inside each run's folder"),
    ("sweep evaluation over the run's summary", ["sweep", "{root}/eval-own.yaml", "--out", "{root}/sw2"],
     "is a file the run writes itself"),
]  # fmt: skip


@pytest.mark.parametrize("words, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_no_command_writes_over_its_inputs_or_into_a_run_folder(ws, capsys, words, expected):
    before = snapshot(ws)
    filled = [w.format(root=ws, model=ws / "model", run=ws / "run") for w in words]
    code = main(filled)
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert snapshot(ws) == before


def test_every_writing_command_has_a_case():
    """A command that takes --out or --output_dir and no case here fails this test."""
    from dpolab.cli import build_parser

    covered = {" ".join(w for w in case[1][:2] if not w.startswith(("{", "-"))) for case in CASES}
    covered |= {case[1][0] for case in CASES}
    parser = build_parser()
    missing = []
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        for command, parser_ in ((f"{name} {k}", v) for k, v in nested[0].choices.items()) if nested else [(name, sub)]:
            options = {o for action in parser_._actions for o in action.option_strings}
            takes_output = {"--out", "--output_dir", "--task-dir", "--tokens", "--plot"} & options
            if (takes_output or name in ("train", "sft", "rm", "ppo")) and command not in covered:
                missing.append(command)
    assert not missing, f"commands that write with no case in CASES: {missing}"
