"""`dpolab report`: self-contained HTML of training and toy runs, rendered for real in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dpolab.report.html import write_report
from dpolab.toy.lab import ToyConfig, run_toy
from dpolab.train import TrainConfig, run
from tests.tiny import save_digit_task, save_tiny_model

PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(6)
    for b in range(4)
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    folders = []
    for loss in ("dpo", "dpop"):
        out = root / loss
        run(
            TrainConfig(
                model=str(root / "llama"),
                data=str(root / "pairs.jsonl"),
                output_dir=str(out),
                loss=loss,
                loss_params={"beta": 0.5},
                cache_dir=str(root / "cache"),
                max_steps=60,
                batch_size=4,
                learning_rate=3e-3,
                progress=False,
                tensorboard=False,
                save_model=False,
                monitor={"probe_steps": 10},
            )
        )
        folders.append(out)
    folders.append(run_toy(ToyConfig(loss="dpo", steps=400)).save(root / "toy-dpo"))
    run(
        TrainConfig(
            task="reward", loss="reward_model", model=str(root / "llama"), data=str(root / "pairs.jsonl"),
            output_dir=str(root / "rm"), max_steps=20, batch_size=4, learning_rate=3e-3, eval_fraction=0.2,
            eval_steps=5, progress=False, tensorboard=False, save_model=False, cache_dir=str(root / "cache"),
        )
    )  # fmt: skip
    folders.append(root / "rm")
    digits = save_digit_task(root / "digits")
    run(
        TrainConfig(
            task="ppo", loss="ppo", model=digits["model"], data=digits["data"], monitor={"pairs": digits["pairs"]},
            output_dir=str(root / "ppo"), max_steps=6, batch_size=4,
            learning_rate=3e-3, eval_fraction=0.2, eval_steps=3, progress=False, tensorboard=False, save_model=False,
            ppo={"reward": {"rules": [{"type": "regex", "pattern": "^\\s*{answer}"}]}, "max_new_tokens": 2,
                 "sample_steps": 3},
        )
    )  # fmt: skip
    folders.append(root / "ppo")
    return root, folders


def test_report_is_self_contained_with_every_plot(runs, tmp_path):
    _, folders = runs
    out = write_report(folders, tmp_path / "report.html")
    text = out.read_text()
    assert not re.search(r"https?://|//cdn|<script|<link", text), "the report must need no network"
    # 8 panels (the held-out one: the RM run's) and PPO's two: its rewards and its KL
    assert text.count('<img alt="plot" src="data:image/png;base64,') == 10
    assert "RLHF-PPO (dpolab ppo), 6 steps: mean rollout reward" in text
    assert re.search(r"greedy held-out reward \d", text)
    assert re.search(r"held-out pairs the chosen log-ratio ended at [+-]\d", text)
    assert "Samples (dpolab ppo: the last logged step)" in text and text.count("<td>ppo</td><td>6</td>") == 4
    assert "degradation" in text and "remedy" in text and "Verdicts" in text
    assert "A reward model (dpolab rm): no policy likelihood, so no 3D monitor." in text
    assert re.search(r"held-out accuracy \d\.\d\d", text)
    assert '<tr class="differs"><th>loss</th>' in text  # dpo vs dpop highlighted
    assert "toy-dpo" in text and "(toy," in text


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH (make test installs Debian's chromium when CI=true)"
)
def test_report_renders_in_headless_chromium_with_plots(runs, tmp_path):
    import matplotlib.image

    _, folders = runs
    page = write_report(folders, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1500,2600",
        f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    # Each run is drawn in its own palette colour, used nowhere else on the page: finding many pixels
    # of each run's colour means its curves were drawn.
    from dpolab.report.html import COLOURS

    for index in range(len(folders)):
        colour = np.array([int(COLOURS[index][i : i + 2], 16) / 255 for i in (1, 3, 5)])
        near = np.abs(pixels - colour).max(axis=-1) < 0.08
        assert int(near.sum()) > 300, f"run {index}: only {int(near.sum())} pixels of its plot colour"


def test_cli_report_and_its_errors(runs, tmp_path):
    _, folders = runs
    ok = subprocess.run(
        [sys.executable, "-m", "dpolab", "report", *map(str, folders), "--out", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0 and "wrote" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dpolab", "report", str(tmp_path), "--out", str(tmp_path / "x.html")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not a dpolab run folder" in bad.stderr
