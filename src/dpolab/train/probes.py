"""The monitor's probes: gradient split by side, held-out likelihood, and the policy's own samples.

They run after a step's update, when the gradients are empty, and leave them empty; they fork the RNG
(``fork_rng``), so a run with probes trains exactly as one without. Every process runs the same probe
on the same pairs through the wrapped model, so under DDP and FSDP the collective forwards and
backwards stay in step and the norms are those of one process.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from dpolab.data.tokenize import TokenizedPair, TokenizedSequence
from dpolab.engine.logps import LogpEngine, naive_token_logps
from dpolab.losses import PreferenceLogps
from dpolab.train.distributed import any_across


def _probe_inputs(sums: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor) -> PreferenceLogps:
    return PreferenceLogps(
        sums[:, 0],
        sums[:, 1],
        None if reference is None else reference[:, 0].to(sums.device),
        None if reference is None else reference[:, 1].to(sums.device),
        lengths[:, 0],
        lengths[:, 1],
    )


def total_norm(parameters) -> float:
    """‖grad‖₂ over every parameter, whole (DDP keeps full gradients; FSDP shards are combined)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def gradient_split_and_likelihood(
    accelerator,
    model,
    objective,
    probe: list[TokenizedPair],
    reference: torch.Tensor | None,
    engine: LogpEngine,
) -> dict[str, float]:
    """‖∇θ Σ w_i log π_w,i‖ and ‖∇θ Σ l_i log π_l,i‖ with w, l the per-pair ∂L/∂log π; probe likelihoods.

    Call it with empty gradients (after ``optimizer.zero_grad(set_to_none=True)``); it leaves them empty.
    """
    ids = list(range(len(probe)))
    parameters = [p for p in model.parameters() if p.requires_grad]
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.no_grad(), accelerator.autocast():
            tokens = engine.token_logps(model, probe, ids)
        sums = tokens.sums().float()
        lengths = tokens.branch_lengths
        metrics = {
            "monitor/probe_chosen_logp": float((sums[:, 0] / lengths[:, 0]).mean()),
            "monitor/probe_rejected_logp": float((sums[:, 1] / lengths[:, 1]).mean()),
        }
        if any_across(accelerator, not bool(torch.isfinite(sums).all())):
            # a blown-up policy: nothing to split (the step's own guard names it); every process skips alike
            return metrics | {"monitor/param_grad_norm_chosen": math.nan, "monitor/param_grad_norm_rejected": math.nan}
        leaves = [sums[:, 0].clone().requires_grad_(True), sums[:, 1].clone().requires_grad_(True)]
        with torch.enable_grad():
            loss = objective(_probe_inputs(torch.stack(leaves, 1), reference, lengths)).losses.sum()
            weights = torch.autograd.grad(loss, leaves, allow_unused=True)
        for side, (name, weight) in enumerate(zip(("chosen", "rejected"), weights, strict=True)):
            if weight is None:  # the loss has no term on this side (e.g. sft has no rejected term)
                metrics[f"monitor/param_grad_norm_{name}"] = 0.0
                continue
            with accelerator.autocast():
                side_logps = engine.token_logps(model, probe, ids).sums()[:, side].float()
            # A plain backward: no loss scaling to undo, and the training step's scaler state is left alone.
            (weight.detach() * side_logps).sum().backward()
            metrics[f"monitor/param_grad_norm_{name}"] = total_norm(parameters)
            for parameter in parameters:
                parameter.grad = None
    return metrics


def sample_probe(
    model,
    reference_model,
    prompts: list[tuple[int, ...]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    device,
    reference_context=nullcontext,
    synced: bool = False,
) -> dict[str, float]:
    """Sample one response per prompt from the policy; score it per token under policy and reference.

    ``synced``: keep every process generating until all have finished (FSDP: each step is collective).
    """
    samples, entropies = [], []
    was_training = model.training
    model.eval()
    # generate() may enter below an FSDP2 root (PEFT calls the base model's forward): gather the root's own
    # parameters for the whole probe; the sharded layers gather theirs as they run.
    root_sharded = hasattr(model, "unshard")
    if root_sharded:
        model.unshard()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            output = model.generate(
                input_ids=torch.tensor([prompt], device=device),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
                synced_gpus=synced,
            )
            new = tuple(output.sequences[0, len(prompt) :].tolist())
            if new:
                samples.append(TokenizedSequence(tuple(prompt), new, len(samples)))
                for scores in output.scores:
                    log_probs = torch.log_softmax(scores[0].float(), dim=-1)
                    entropies.append(float(-(log_probs.exp() * log_probs).sum()))
        metrics = {}
        if samples:
            lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32, device=device)
            policy = naive_token_logps(model, samples, pad_token_id, device).sums()[:, 0].float()
            metrics["monitor/sample_logp_policy"] = float((policy / lengths).mean())
            metrics["monitor/sample_entropy"] = sum(entropies) / len(entropies)
            metrics["monitor/sample_tokens"] = float(lengths.mean())
            scorer = reference_model if reference_model is not None else model
            with reference_context():
                reference = naive_token_logps(scorer, samples, pad_token_id, device).sums()[:, 0].float()
            metrics["monitor/sample_logp_reference"] = float((reference / lengths).mean())
            metrics["monitor/sample_logratio"] = (
                metrics["monitor/sample_logp_policy"] - metrics["monitor/sample_logp_reference"]
            )
    if root_sharded:
        model.reshard()
    model.train(was_training)
    return metrics
