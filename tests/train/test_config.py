"""dpolab.train.config: TRL's names through the one map of the loss catalogue, and one SFT reduction key."""

from __future__ import annotations

import pytest
import torch

from dpolab.losses import LOSSES, TRL_DPO_LOSS_TYPES, PreferenceLogps, objective_from_trl
from dpolab.train.config import load_config, upgrade_saved_config


@pytest.fixture
def base(tmp_path) -> list[str]:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Q", "chosen": " a", "rejected": " b"}\n')
    return ["--model", "org/model", "--data", str(data), "--output_dir", str(tmp_path / "out")]


def logps() -> PreferenceLogps:
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(4, generator=generator, dtype=torch.float64) - 5 for _ in range(4)]
    lengths = torch.tensor([3, 5, 2, 7])
    return PreferenceLogps(*values, lengths, lengths + 1)


def config_objective(config):
    from dpolab.losses import objective_from_config

    return objective_from_config(config.loss, config.loss_weights, config.loss_params, config.sft_weight,
                                 config.sft_reduction)  # fmt: skip


@pytest.mark.parametrize("loss_type", sorted(TRL_DPO_LOSS_TYPES))
def test_a_trl_loss_type_with_beta_means_what_objective_from_trl_means(base, loss_type, capsys):
    """TRL's config (loss_type + beta) read by `dpolab train` computes the same losses as objective_from_trl, for
    every loss type: IPO's beta is τ, sft ignores beta (it used to fail: "no loss among ['ipo'] has a parameter
    'beta'")."""
    config = load_config(None, [*base, "--loss_type", loss_type, "--beta", "0.3"])
    # label_smoothing is TRL's own key (not translated): compare at dpolab's default, where a loss reads it
    smoothing = LOSSES[TRL_DPO_LOSS_TYPES[loss_type]].defaults.get("label_smoothing", 0.0)
    expected = objective_from_trl(loss_type, beta=0.3, label_smoothing=smoothing)(logps())
    got = config_objective(config)(logps())
    torch.testing.assert_close(got.losses, expected.losses, rtol=0, atol=1e-12)
    if loss_type == "ipo":
        assert config.loss_params == {"tau": 0.3}
    assert "TRL's beta is" in capsys.readouterr().err


def test_beta_of_a_trl_loss_list_reaches_every_loss_that_reads_it(base):
    config = load_config(None, [*base, "--loss_type", "[sigmoid, ipo, sft]", "--beta", "0.2"])
    assert config.loss_params == {"beta": 0.2, "tau": 0.2}
    expected = objective_from_trl(["sigmoid", "ipo", "sft"], beta=0.2)(logps())
    torch.testing.assert_close(config_objective(config)(logps()).losses, expected.losses, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="conflicts with loss_params.tau"):
        load_config(None, [*base, "--loss_type", "ipo", "--beta", "0.2", "--loss_params", "{tau: 0.5}"])


def test_the_trl_map_is_read_off_the_loss_catalogue():
    assert TRL_DPO_LOSS_TYPES["sigmoid"] == "dpo" and TRL_DPO_LOSS_TYPES["ipo"] == "ipo"
    assert all(LOSSES[name].trl_name == trl for trl, name in TRL_DPO_LOSS_TYPES.items())
    assert "simpo" not in TRL_DPO_LOSS_TYPES and "orpo" not in TRL_DPO_LOSS_TYPES.values()  # other trainers


def test_one_sft_reduction_key_with_one_default(base, capsys):
    """sft_reduction governs every SFT NLL: the sft_weight term, the sft loss, and `dpolab sft`; its default is
    TRL's token-weighted batch mean. loss_params.reduction (the key dpolab sft used to read) is translated."""
    default = load_config(None, [*base, "--sft_weight", "0.5"])
    assert default.sft_reduction == "batch_token_mean"
    legacy = load_config(None, [*base, "--loss", "sft", "--loss_params", "{reduction: sum}"])
    assert (legacy.sft_reduction, legacy.loss_params) == ("sum", {})
    assert "loss_params.reduction is sft_reduction" in capsys.readouterr().err
    sums = config_objective(legacy)(logps()).losses
    torch.testing.assert_close(sums, -logps().policy_chosen_logps)  # the sequence NLL, as asked
    with pytest.raises(ValueError, match="disagree"):
        load_config(
            None, [*base, "--loss", "sft", "--loss_params", "{reduction: sum}", "--sft_reduction", "token_mean"]
        )


def test_a_checkpoint_of_dpolab_sft_before_the_one_key_resumes_as_the_same_run():
    """Before: dpolab sft read loss_params.reduction and ignored sft_reduction. The upgraded config says the same
    run in this version's keys, so resuming does not see a changed objective."""
    saved = {
        "task": "sft",
        "loss": "sft",
        "loss_params": {"reduction": "batch_token_mean"},
        "sft_reduction": "token_mean",
    }
    upgraded = upgrade_saved_config(saved)
    assert (upgraded["loss_params"], upgraded["sft_reduction"]) == ({}, "batch_token_mean")
    preference = {"task": "preference", "loss": "dpo", "loss_params": {"beta": 0.1}, "sft_reduction": "token_mean"}
    assert upgrade_saved_config(preference)["sft_reduction"] == "token_mean"


def test_a_checkpoint_from_before_typed_settings_compares_equal_to_the_same_config_now(base):
    """Typed sections write every field; a checkpoint from before holds only the keys its run was given
    (monitor: {window: 3}, ppo: {} off task ppo). Resuming compares the two as the same run."""
    from dpolab.train.checkpoint import config_differences

    config = load_config(None, [*base, "--monitor", "{window: 3}", "--lora", "{r: 4, bias: none}"])
    before = {**config.to_dict(), "monitor": {"window": 3}, "ppo": {}, "eval_harness": {},
              "lora": {"r": 4, "bias": "none"}}  # fmt: skip
    assert config_differences(upgrade_saved_config(before), config.to_dict()) == []
    assert config_differences(before, config.to_dict()) != []  # without the upgrade they would differ
    changed = {**before, "monitor": {"window": 4}}
    assert config_differences(upgrade_saved_config(changed), config.to_dict()) == ["monitor"]


def test_nested_sections_are_typed_once_and_written_back_as_mappings(base, tmp_path):
    import yaml

    from dpolab.settings import LoraSettings, MonitorSettings

    config = load_config(None, [*base, "--monitor.window", "5", "--lora", "{r: 4, alpha: 8, bias: none}"])
    assert isinstance(config.monitor, MonitorSettings) and config.monitor.window == 5
    assert isinstance(config.lora, LoraSettings) and config.lora.peft_kwargs()["bias"] == "none"
    written = config.to_dict()
    assert written["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "bias": "none"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(written))
    again = load_config(str(path))
    assert again.to_dict() == written  # the config.yaml a run writes reads back as the same settings
    with pytest.raises(ValueError, match="monitor.windw: not a monitor setting"):
        load_config(None, [*base, "--monitor.windw", "5"])
