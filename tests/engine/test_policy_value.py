"""The policy and its critic as one module: packed per-token log-probs, values and entropies of rollouts equal
the naive path and a direct computation from the models' own outputs; the reference mode is the base model."""

from __future__ import annotations

import pytest
import torch

from dpolab.engine.policy_value import PolicyWithValue, Rollout, rollout_outputs
from tests.tiny import tiny_causal_lm, tiny_scalar_model

VOCAB = 50
CPU = torch.device("cpu")


def rollouts(seed: int = 0, k: int = 2) -> list[Rollout]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, VOCAB, (n,), generator=generator).tolist())

    return [Rollout(ids(3 + i), tuple(ids(1 + (i + j) % 4) for j in range(k))) for i in range(4)]


def policy_with(critic: str) -> PolicyWithValue:
    policy = tiny_causal_lm("llama", VOCAB, seed=1, dtype=torch.float64)
    if critic == "model":
        return PolicyWithValue(policy, tiny_scalar_model("llama", VOCAB, seed=2, dtype=torch.float64)).eval()
    model = PolicyWithValue(policy, value_head=True).double().eval()
    with torch.no_grad():  # zero at init; random here so that wrong positions give wrong values
        model.value_head.weight.normal_(generator=torch.Generator().manual_seed(3))
        model.value_head.bias.fill_(0.5)
    return model


def direct(model: PolicyWithValue, items: list[Rollout], temperature: float):
    """Per response token: log π_T, V and entropy from one unpadded forward per response."""
    logps, values, entropies = [], [], []
    for item in items:
        for response in item.responses:
            ids = torch.tensor([item.prompt_ids + response])
            with torch.no_grad():
                output = model.policy(input_ids=ids, output_hidden_states=True)
                log_probs = torch.log_softmax(output.logits[0] / temperature, -1)
                if model.critic is not None:
                    value = model.critic.model(input_ids=ids).last_hidden_state @ model.critic.score.weight.T
                else:
                    value = model.value_head(output.hidden_states[-1])
            at = torch.arange(len(item.prompt_ids) - 1, ids.shape[1] - 1)
            logps.append(log_probs[at, ids[0, at + 1]])
            values.append(value[0, at, 0])
            entropies.append(-(log_probs[at].exp() * log_probs[at]).sum(-1))
    return torch.cat(logps), torch.cat(values), torch.cat(entropies)


@pytest.mark.parametrize("critic", ["head", "model"])
@pytest.mark.parametrize("naive", [False, True], ids=["packed", "naive"])
def test_rollout_outputs_equal_a_direct_computation(critic, naive):
    model = policy_with(critic)
    items = rollouts()
    with torch.no_grad():
        out = rollout_outputs(model, items, list(range(len(items))), 0, CPU, temperature=0.7, entropy=True,
                              naive=naive, row_tokens=24)  # fmt: skip
    logps, values, entropies = direct(model, items, 0.7)
    torch.testing.assert_close(out.logps, logps, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.values, values, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.entropy, entropies, atol=1e-10, rtol=0)
    assert out.mask().sum() == sum(len(r) for item in items for r in item.responses)
    assert float(values.std()) > 1e-3


def test_a_plain_causal_lm_gives_the_reference_log_probs():
    model = policy_with("head")
    items = rollouts(seed=4, k=3)
    with torch.no_grad():
        plain = rollout_outputs(model.policy, items, list(range(len(items))), 0, CPU)
        wrapped = rollout_outputs(model, items, list(range(len(items))), 0, CPU)
    torch.testing.assert_close(plain.logps, wrapped.logps, atol=1e-12, rtol=0)
    assert plain.values is None


def test_reference_mode_switches_the_lora_adapter_off():
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm("llama", VOCAB, seed=1, dtype=torch.float64)
    items = rollouts(seed=5)
    with torch.no_grad():
        expected = rollout_outputs(base, items, list(range(len(items))), 0, CPU).logps
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = PolicyWithValue(adapted, value_head=True).double().eval()
    with torch.no_grad():
        reference = rollout_outputs(model, items, list(range(len(items))), 0, CPU, mode="reference").logps
        policy = rollout_outputs(model, items, list(range(len(items))), 0, CPU).logps
    torch.testing.assert_close(reference, expected, atol=1e-12, rtol=0)
    assert float((policy - expected).abs().max()) > 1e-3  # the adapter (random, not zero) changes the policy
