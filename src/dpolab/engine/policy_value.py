"""The policy and its value function as one module, and per-token log-probs, values and entropies of rollouts.

RLHF-PPO trains two functions of the same sequences: the policy π (a causal LM) and the value V(s_t), the
expected return from each response token on. :class:`PolicyWithValue` holds both — a value head on the
policy's last hidden state (``value_model: head``), a separate model with a one-output score head, or none
(critic-free advantages) — behind one ``forward``, so one DDP/FSDP wrapper, one optimiser and one checkpoint
cover them, and every forward (rollout decoding, the reference pass under LoRA, the update) goes through the
wrapped module's own call.

A rollout is an item of :mod:`dpolab.data.packing`: a prompt with k sampled responses as its branches, so
the k responses of one prompt share one pass over it. :func:`rollout_outputs` returns, for every response
token t, log π(a_t | s_t) of the temperature-scaled policy (the distribution that was sampled), V(s_t) read
at the same position (the one whose output predicts a_t), and the entropy of π(· | s_t); the packed path
and the naive one (one right-padded row per response) agree (tests/engine/test_policy_value.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from dpolab.data.packing import Item, pack
from dpolab.engine.attention import Kernel, packed_inputs
from dpolab.engine.logps import _at_least_fp32, head_only_at, naive_positions, output_head, padded_rows
from dpolab.engine.scores import recorded_head_output


@dataclass(frozen=True)
class Rollout:
    """A prompt and the responses sampled for it (token ids; each ends with the EOS unless cut)."""

    prompt_ids: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]:
        return self.responses

    @property
    def unique_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.responses)


@contextmanager
def head_input(model):
    """While active, the yielded list receives what the LM head is given (after any position selection)."""
    seen: list[torch.Tensor] = []

    def record(module, args):  # noqa: ARG001 - hook signature
        seen.append(args[0])

    handle = output_head(model).register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


class PolicyWithValue(torch.nn.Module):
    """π and V as one module. ``critic``: a model with a one-output score head; else ``value_head=True`` puts a
    linear head (zero-initialised: V ≡ 0 at the start) on the policy's final hidden state; else no values."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None = None, value_head: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = None
        if critic is None and value_head:
            head = output_head(policy)
            self.value_head = torch.nn.Linear(head.weight.shape[1], 1, dtype=head.weight.dtype)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    @property
    def has_values(self) -> bool:
        return self.critic is not None or self.value_head is not None

    def get_output_embeddings(self):
        return output_head(self.policy)

    def save_pretrained(self, directory, state_dict: dict | None = None, safe_serialization: bool = True) -> None:
        """The policy in Hugging Face format in ``directory`` (what ``dpolab eval`` and a next run load); the
        value head in ``value_head.safetensors`` there, or the separate critic in ``directory/value_model``."""
        from pathlib import Path

        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()

        def part(prefix: str) -> dict:
            return {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}

        self.policy.save_pretrained(directory, state_dict=part("policy."), safe_serialization=safe_serialization)
        if self.value_head is not None:
            tensors = {name: value.detach().contiguous().cpu() for name, value in part("value_head.").items()}
            save_file(tensors, str(Path(directory) / "value_head.safetensors"))
        elif self.critic is not None:
            self.critic.save_pretrained(Path(directory) / "value_model", state_dict=part("critic."))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        mode: str = "train",
        **decoding,
    ):
        """``mode="train"``: (logits, values or None), both at ``select`` (flat row × column positions) when
        given, else at every position. ``"decode"``: the policy's own output (``decoding`` carries the KV
        cache). ``"reference"``: the policy's logits with its LoRA adapter switched off (the frozen base)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if mode == "decode":
            return self.policy(**inputs, **decoding)
        only_selected = head_only_at(self.policy, select) if select is not None else nullcontext()
        if mode == "reference":
            with self.policy.disable_adapter(), only_selected:
                return self.policy(**inputs, use_cache=False).logits, None
        with only_selected, head_input(self.policy) as hidden:
            logits = self.policy(**inputs, use_cache=False).logits
        values = None
        if self.value_head is not None:  # at the positions the LM head saw
            # sum over the one output: a new tensor, not a view (FSDP2 warns of views returned by a root)
            values = self.value_head(hidden[-1].to(self.value_head.weight.dtype)).sum(-1)
        elif self.critic is not None:
            with recorded_head_output(self.critic) as outputs:
                self.critic(**inputs, use_cache=False)
            values = outputs[-1].sum(-1)
            if select is not None:
                values = values.reshape(-1)[select][None]
        return logits, values


@dataclass
class RolloutOutputs:
    """Per response token of a micro-batch of rollouts, in the layout of :class:`~dpolab.engine.logps.TokenLogps`."""

    logps: torch.Tensor  # (n,) log π_T(a_t | s_t), at least fp32
    values: torch.Tensor | None  # (n,) V(s_t)
    entropy: torch.Tensor | None  # (n,) H(π_T(· | s_t)), detached
    sequence: torch.Tensor  # (n,) response number: item × k + sample
    index: torch.Tensor  # (n,) position within the response
    branch_lengths: torch.Tensor  # (items, k)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` as (responses, longest response), 0 after each response's end."""
        items, k = self.branch_lengths.shape
        out = values.new_zeros(items * k, int(self.branch_lengths.max()))
        return out.index_put((self.sequence, self.index), values)

    def mask(self) -> torch.Tensor:
        return self.dense(torch.ones_like(self.logps))


def _token_outputs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    log_probs = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    logps = log_probs.gather(-1, targets[:, None])[:, 0]
    return logps, (-(log_probs.exp() * log_probs).sum(-1)).detach() if entropy else None


def rollout_outputs(
    model,
    items: list[Item],
    ids: list[int],
    pad_token_id: int,
    device,
    *,
    temperature: float = 1.0,
    mode: str = "train",
    entropy: bool = False,
    naive: bool = False,
    row_tokens: int = 512,
    kernel: Kernel = "dense",
) -> RolloutOutputs:
    """Log-probs (and values, entropies) of every response token of ``items`` under ``model``.

    ``model`` is a :class:`PolicyWithValue` (possibly wrapped; ``mode`` as in its forward) or a plain causal
    LM (a frozen reference). ``naive``: one right-padded row per response instead of the packed rows;
    ``kernel``: the attention kernel of the packed rows (:mod:`dpolab.engine.attention`)."""
    plain = not isinstance(getattr(model, "module", model), PolicyWithValue) and not isinstance(model, PolicyWithValue)
    extra = {} if plain else {"mode": mode}
    if naive:
        input_ids, attention = padded_rows(items, pad_token_id, device)
        output = model(input_ids=input_ids, attention_mask=attention, **extra)
        logits, values = (output.logits, None) if plain else output
        rows_at, columns, sequence, index, lengths = naive_positions(items, input_ids.device)
        targets = input_ids[rows_at, columns + 1]
        logits = logits[rows_at, columns]
        values = values[rows_at, columns] if values is not None else None
    else:
        batch = pack(items, ids, row_tokens, pad_token_id).to(device)
        inputs = packed_inputs(model, batch, kernel)
        if plain:
            with head_only_at(model, batch.predict_positions):
                logits, values = model(**inputs, use_cache=False).logits, None
        else:
            logits, values = model(**inputs, select=batch.predict_positions, **extra)
        logits, values = logits[0], values[0] if values is not None else None
        targets, sequence, index, lengths = (
            batch.target_ids, batch.target_sequence, batch.target_index, batch.branch_lengths,
        )  # fmt: skip
    logps, entropies = _token_outputs(logits, targets, temperature, entropy)
    values = _at_least_fp32(values) if values is not None else None
    return RolloutOutputs(logps, values, entropies, sequence, index, lengths)


# --- a recipe's sampling and scoring, bound once --------------------------------------------------------------


def mix(*numbers: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), for per-sample and per-epoch generators."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (number & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value >> 1


@dataclass
class RolloutEngine:
    """What a recipe that samples responses and scores their tokens binds once (PPO, and its 3D monitor):
    the decoding forward, the sampling settings, the token ids and the packing of the scoring passes."""

    decode: Callable  # the policy's forward for decoding, through the wrapped module's own call
    pad_token_id: int
    eos_token_id: int
    device: torch.device
    max_new_tokens: int
    temperature: float
    top_p: float
    naive: bool = False
    row_tokens: int = 512
    kernel: Kernel = "dense"
    keep_going: Callable[[bool], bool] | None = None  # lock-step decoding across processes (FSDP)

    def generate(self, prompts: list[tuple[int, ...]], seeds: list[int] | None, **sampling) -> list:
        """One response per prompt (``seeds=None``: greedy); ``sampling``: ``max_new_tokens``, ``temperature``,
        ``top_p`` other than the run's (the monitor samples at T = 1)."""
        from dpolab.engine.generate import sample_responses

        settings = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        return sample_responses(
            self.decode, prompts, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            device=self.device, seeds=seeds, keep_going=self.keep_going, **{**settings, **sampling},
        )  # fmt: skip

    def token_pass(self, model, items: list, mode: str = "train", entropy: bool = False, temperature=None):
        """Per-token outputs of ``items`` (rollouts, or pairs) under ``model``; the run's temperature unless given."""
        return rollout_outputs(
            model, items, list(range(len(items))), self.pad_token_id, self.device,
            temperature=self.temperature if temperature is None else temperature, mode=mode, entropy=entropy,
            naive=self.naive, row_tokens=self.row_tokens, kernel=self.kernel,
        )  # fmt: skip
