"""The recipes, by name: what ``task:`` runs, the command that runs it, and what that command sets.

``dpolab.train.run``, the command line (``dpolab train|sft|rm|ppo``) and ``dpolab sweep`` look a method up
here. Adding a method is adding its recipe module (one file with ``train(config, resume, overwrite)``, the
shape of :mod:`dpolab.train.sft`) and one line below; docs/training.md#adding-a-method shows it.

A recipe's module is imported only when it runs, so ``dpolab --help`` imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    task: str
    """The config's ``task:`` value."""
    command: str
    """The ``dpolab`` command that runs it (its config keys are ``dpolab train``'s)."""
    module: str
    """The module whose ``train(config, resume=None, overwrite=False)`` runs it."""
    help: str
    """One line for ``dpolab --help``."""
    description: str = ""
    """The paragraph of ``dpolab COMMAND --help``."""
    defaults: dict = field(default_factory=dict)
    """What the command sets before the config file and the flags (which may override it)."""

    def train(self) -> Callable:
        return importlib.import_module(self.module).train


RECIPES: dict[str, Recipe] = {
    recipe.task: recipe
    for recipe in (
        Recipe(
            "preference", "train", "dpolab.train.preference",
            "preference-train a Hugging Face causal LM from a YAML config",
            "Train with CONFIG.yaml; any config key can be overridden as --key value (nested: --loss_params.beta "
            "0.3). --resume [CHECKPOINT] continues a stopped run; --overwrite replaces a run in output_dir; --keys "
            "prints every key with its default and meaning.",
        ),
        Recipe(
            "sft", "sft", "dpolab.train.sft",
            "supervised fine-tuning of a Hugging Face causal LM (prompt + completion rows, or messages)",
            "dpolab train with task: sft and loss: sft (the NLL of completion tokens only, reduced per "
            "sft_reduction); see docs/training.md.",
            {"task": "sft", "loss": "sft"},
        ),
        Recipe(
            "reward", "rm", "dpolab.train.reward",
            "train a reward model (Bradley–Terry) on preference pairs: a causal LM with a scalar head",
            "dpolab train with task: reward and loss: reward_model: −log σ(r_w − r_l − margin) + c·(r_w + r_l)², "
            "the score read at the last token of each completion, chosen and rejected in one packed pass. Optional "
            "margin column; loss_params.center_coefficient is c (TRL's center_rewards_coefficient); see "
            "docs/rlhf.md.",
            {"task": "reward", "loss": "reward_model"},
        ),
        Recipe(
            "ppo", "ppo", "dpolab.train.ppo",
            "RLHF-PPO of a causal LM on prompts: sampled responses, a reward (reward model, math judge or rules)",
            "dpolab train with task: ppo. Each step samples responses to batch_size prompts per process, scores "
            "them (ppo.reward: {model: DIR} | {judge: math} | {rules: [...]}), and runs ppo.ppo_epochs passes of "
            "the clipped PPO loss with a KL penalty to the initial policy; ppo.advantage: rloo for the critic-free "
            "variant; the ppo: settings are in docs/rlhf.md.",
            {"task": "ppo", "loss": "ppo"},
        ),
    )
}  # fmt: skip

COMMANDS: dict[str, Recipe] = {recipe.command: recipe for recipe in RECIPES.values()}
"""The same recipes by command name (``train``, ``sft``, ``rm``, ``ppo``)."""


def recipe(task: str) -> Recipe:
    """The recipe of ``task``; ``ValueError`` listing the known ones."""
    if task not in RECIPES:
        raise ValueError(f"task: must be one of {', '.join(RECIPES)}; got {task!r}")
    return RECIPES[task]
