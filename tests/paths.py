"""Where the tests find the repository's data slices (data/README.md): a clone alone runs every test."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
GSM8K_SOLUTIONS = DATA / "gsm8k" / "model_solutions.jsonl"
HH_RLHF = DATA / "hh-rlhf" / "harmless_base_test_part.jsonl"
