"""dpolab's losses against TRL 1.16 on the same inputs.

TRL computes its DPO losses inside ``DPOTrainer._compute_loss``, which also runs the model, so each
test builds a real ``DPOTrainer`` around two tiny random-init models (policy and a *different*
reference, so the log-ratios are not zero; float64, and ``bf16=False`` since TRL's configs default to
bf16 autocast of the reference), takes TRL's loss on one batch, recomputes the per-sequence
log-probs of that same batch with a naive forward, and feeds them to dpolab. SimPO and ORPO are
checked the same way against TRL's ``CPOTrainer`` and ``ORPOTrainer``.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import trl  # the `bench` extra, installed by `make test`: parity is never skipped
from datasets import Dataset

from dpolab import losses as L
from tests.tiny import sequence_logps, tiny_llama, tiny_tokenizer

PAIRS = {
    "prompt": [
        "Natalia sold clips",
        "Weng earns 12",
        "two plus",
        "Human: how do I bake bread? Assistant:",
        "The answer",
        "three times",
        "She sold half",
        "Yesterday, she",
    ],
    "chosen": [
        " to 48 of her friends",
        " an hour",
        " two is four",
        " mix flour, water, salt and yeast",
        " is 72.",
        " three is nine",
        " as many clips in May.",
        " just did 50 minutes",
    ],
    "rejected": [
        " in April",
        " for babysitting. Yesterday",
        " three is nine and two",
        " bake",
        " is 10. The answer is 5.",
        " is four",
        " clips",
        " babysitting",
    ],
}


@pytest.fixture(scope="module")
def setup():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = tiny_tokenizer()
    # A wide init makes per-token log-probs vary a lot, so batch orderings (used by AOT) are not
    # simply the length order.
    policy = tiny_llama(tokenizer, seed=0, initializer_range=0.6)
    reference = tiny_llama(tokenizer, seed=1, initializer_range=0.6)
    return tokenizer, policy, reference, Dataset.from_dict(PAIRS)


def trl_dpo_loss(setup, tmp_path, **config):
    tokenizer, policy, reference, dataset = setup
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(dataset),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=128,
        bf16=False,
        **config,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # TRL patches the models in place (its fused LM head) and the patch is not idempotent: give
        # each trainer its own copies and keep the originals for dpolab's side.
        trainer = trl.DPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss.detach()), batch


def dpolab_logps_from_trl_batch(setup, batch) -> L.PreferenceLogps:
    _, policy, reference, _ = setup
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy_logps, lengths = sequence_logps(policy, *args)
    reference_logps, _ = sequence_logps(reference, *args)
    n = len(policy_logps) // 2  # TRL's batch is [chosen rows, rejected rows]
    return L.PreferenceLogps(
        policy_logps[:n], policy_logps[n:], reference_logps[:n], reference_logps[n:], lengths[:n], lengths[n:]
    )


CASES = [
    dict(loss_type=["sigmoid"], beta=0.1),
    dict(loss_type=["sigmoid"], beta=0.7),
    dict(loss_type=["sigmoid"], beta=0.1, f_divergence_type="forward_kl"),
    dict(loss_type=["sigmoid"], beta=0.1, f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid"], beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["hinge"], beta=0.2),
    dict(loss_type=["hinge"], beta=0.2, f_divergence_type="js_divergence"),
    dict(loss_type=["ipo"], beta=0.1),
    dict(loss_type=["ipo"], beta=0.5, f_divergence_type="forward_kl"),
    dict(loss_type=["exo_pair"], beta=0.1, label_smoothing=1e-3),
    dict(loss_type=["nca_pair"], beta=0.1),
    dict(loss_type=["robust"], beta=0.1, label_smoothing=0.1),
    dict(loss_type=["robust"], beta=0.1, label_smoothing=0.2, f_divergence_type="alpha_divergence"),
    dict(loss_type=["bco_pair"], beta=0.1),
    dict(loss_type=["sppo_hard"], beta=0.1),
    dict(loss_type=["aot"], beta=0.1),
    dict(loss_type=["aot"], beta=0.3, label_smoothing=0.1),
    dict(loss_type=["aot_unpaired"], beta=0.1, label_smoothing=0.05),
    dict(loss_type=["apo_zero"], beta=0.1),
    dict(loss_type=["apo_down"], beta=0.1),
    dict(loss_type=["discopop"], beta=0.1, discopop_tau=0.05),
    dict(loss_type=["discopop"], beta=0.05, discopop_tau=0.2, f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid_norm"], beta=0.1),
    dict(loss_type=["sigmoid_norm"], beta=0.3, f_divergence_type="forward_kl"),
    dict(loss_type=["sft"]),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1),  # MPO
]


@pytest.mark.parametrize(
    "config",
    CASES,
    ids=lambda c: "+".join(c["loss_type"]) + "-" + "-".join(f"{k}={v}" for k, v in c.items() if k != "loss_type"),
)
def test_dpo_trainer_losses_equal_trl(setup, tmp_path, config):
    trl_loss, batch = trl_dpo_loss(setup, tmp_path, **config)
    objective = L.objective_from_trl(**config)
    ours = objective(dpolab_logps_from_trl_batch(setup, batch)).losses.mean()
    # float64 models, but TRL's fused head gives float32 per-token log-probs (~1e-5 absolute error on
    # log-ratios of ±40 here). Scores linear in the log-ratio keep that ~1e-7 relative; the exp() of
    # forward-KL and α-divergence turns it into ~1e-5 relative.
    exponential = config.get("f_divergence_type") in ("forward_kl", "alpha_divergence")
    assert float(ours) == pytest.approx(trl_loss, rel=3e-5 if exponential else 1e-6, abs=1e-7)


def test_aot_case_is_discriminative(setup, tmp_path):
    """AOT sorts over the batch; the inputs must not already be sorted alike, or a bug would hide."""
    _, batch = trl_dpo_loss(setup, tmp_path, loss_type=["aot"])
    logps = dpolab_logps_from_trl_batch(setup, batch)
    aot = L.aot(logps).losses.mean()
    dpo = L.dpo(logps).losses.mean()
    assert abs(float(aot) - float(dpo)) > 1e-3


def label_logps(model, input_ids, attention_mask, labels):
    return sequence_logps(model, input_ids, attention_mask, (labels != -100).long())


def reference_free_logps(setup, batch) -> L.PreferenceLogps:
    _, policy, _, _ = setup
    chosen, chosen_lengths = label_logps(
        policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
    )
    rejected, rejected_lengths = label_logps(
        policy, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"]
    )
    return L.PreferenceLogps(chosen, rejected, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


def drive(trainer_class, setup, args):
    tokenizer, policy, _, dataset = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_class(
            model=copy.deepcopy(policy), args=args, train_dataset=dataset, processing_class=tokenizer
        )
        batch = next(iter(trainer.get_train_dataloader()))
        return float(trainer.compute_loss(trainer.model, batch).detach()), batch


@pytest.mark.parametrize(
    "beta, gamma, label_smoothing, cpo_alpha", [(2.0, 1.0, 0.0, 0.0), (0.5, 0.3, 0.1, 0.0), (2.0, 1.0, 0.0, 1.0)]
)
def test_simpo_equals_trl_cpo_trainer(setup, tmp_path, beta, gamma, label_smoothing, cpo_alpha):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        cpo_alpha=cpo_alpha,
        label_smoothing=label_smoothing,
        per_device_train_batch_size=len(setup[3]),
        report_to=[],
        use_cpu=True,
        max_length=128,
        bf16=False,
    )
    trl_loss, batch = drive(CPOTrainer, setup, args)
    # TRL's CPO adds cpo_alpha × (token-weighted NLL of the chosen): dpolab's sft_weight with batch_token_mean.
    objective = L.Objective(
        [L.LossTerm("simpo", params=dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing))],
        sft_weight=cpo_alpha,
        sft_reduction="batch_token_mean",
    )
    ours = objective(reference_free_logps(setup, batch)).losses.mean()
    assert float(ours) == pytest.approx(trl_loss, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_equals_trl_orpo_trainer(setup, tmp_path, lam):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(
        output_dir=str(tmp_path),
        beta=lam,
        per_device_train_batch_size=len(setup[3]),
        report_to=[],
        use_cpu=True,
        max_length=128,
        bf16=False,
    )
    trl_loss, batch = drive(ORPOTrainer, setup, args)
    out = L.compute_loss("orpo", reference_free_logps(setup, batch), lam=lam)
    # TRL's ORPOTrainer takes the NLL over prompt *and* completion tokens; dpolab follows the ORPO paper
    # (completion only). Swap in the full-sequence NLL to check everything else is identical.
    _, policy, _, _ = setup
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    full_logps, full_counts = sequence_logps(policy, ids, mask, mask)
    full_sequence_nll = -full_logps.sum() / full_counts.sum()
    ours_with_trl_nll = out.losses.mean() - out.terms["nll"].mean() + full_sequence_nll
    assert float(ours_with_trl_nll) == pytest.approx(trl_loss, rel=1e-6, abs=1e-7)
    assert float(out.terms["nll"].mean()) != pytest.approx(float(full_sequence_nll), rel=1e-3)


def test_trl_mapping_rejects_f_divergence_where_trl_does():
    with pytest.raises(ValueError, match="f_divergence_type='forward_kl' is not defined for TRL loss 'bco_pair'"):
        L.objective_from_trl(loss_type=["bco_pair"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="unknown TRL loss_type 'kto'"):
        L.objective_from_trl(loss_type=["kto"])
