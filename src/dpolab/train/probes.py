"""The monitor's probes: gradient split by side, held-out likelihood, and the policy's own samples.

They never touch ``.grad`` (``torch.autograd.grad``) nor the training RNG (``fork_rng``), so a run
with probes trains exactly as one without.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from dpolab.data.packing import pack
from dpolab.data.tokenize import TokenizedPair
from dpolab.engine.logps import naive_logps, packed_logps
from dpolab.losses import PreferenceLogps


def gradient_split_and_likelihood(
    model,
    objective,
    probe: list[TokenizedPair],
    reference: tuple,
    row_tokens: int,
    pad_token_id: int,
    device,
    autocast=nullcontext,
    naive: bool = False,
) -> dict[str, float]:
    """‖∇θ Σ w_i log π_w,i‖ and ‖∇θ Σ l_i log π_l,i‖ with w, l the per-pair ∂L/∂log π; probe likelihoods."""
    ids = list(range(len(probe)))
    batch = pack(probe, ids, row_tokens, pad_token_id).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    with autocast():  # the naive path for models that cannot take the packed mask (see check_packing)
        logps = naive_logps(model, probe, pad_token_id, device) if naive else packed_logps(model, batch)
    chosen, rejected = logps.chosen.float(), logps.rejected.float()
    metrics = {
        "monitor/probe_chosen_logp": float((chosen.detach() / batch.chosen_lengths).mean()),
        "monitor/probe_rejected_logp": float((rejected.detach() / batch.rejected_lengths).mean()),
    }
    leaves = [chosen.detach().requires_grad_(True), rejected.detach().requires_grad_(True)]
    inputs = PreferenceLogps(
        leaves[0],
        leaves[1],
        None if reference[0] is None else reference[0].to(device),
        None if reference[1] is None else reference[1].to(device),
        batch.chosen_lengths,
        batch.rejected_lengths,
    )
    weights = torch.autograd.grad(objective(inputs).losses.sum(), leaves, allow_unused=True)
    for name, side, weight in (("chosen", chosen, weights[0]), ("rejected", rejected, weights[1])):
        if weight is None:  # the loss has no term on this side (e.g. sft has no rejected term)
            metrics[f"monitor/param_grad_norm_{name}"] = 0.0
            continue
        grads = torch.autograd.grad((weight.detach() * side).sum(), parameters, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
        metrics[f"monitor/param_grad_norm_{name}"] = float(norm)
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
) -> dict[str, float]:
    """Sample one response per prompt from the policy; score it per token under policy and reference."""
    samples, entropies = [], []
    was_training = model.training
    model.eval()
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
            )
            new = tuple(output.sequences[0, len(prompt) :].tolist())
            if new:
                samples.append(TokenizedPair(tuple(prompt), new, new, len(samples)))
                for scores in output.scores:
                    log_probs = torch.log_softmax(scores[0].float(), dim=-1)
                    entropies.append(float(-(log_probs.exp() * log_probs).sum()))
        metrics = {}
        if samples:
            lengths = torch.tensor([len(s.chosen_ids) for s in samples], dtype=torch.float32, device=device)
            policy = naive_logps(model, samples, pad_token_id, device).chosen.float()
            metrics["monitor/sample_logp_policy"] = float((policy / lengths).mean())
            metrics["monitor/sample_entropy"] = sum(entropies) / len(entropies)
            metrics["monitor/sample_tokens"] = float(lengths.mean())
            scorer = reference_model if reference_model is not None else model
            with reference_context():
                reference = naive_logps(scorer, samples, pad_token_id, device).chosen.float()
            metrics["monitor/sample_logp_reference"] = float((reference / lengths).mean())
            metrics["monitor/sample_logratio"] = (
                metrics["monitor/sample_logp_policy"] - metrics["monitor/sample_logp_reference"]
            )
    model.train(was_training)
    return metrics
