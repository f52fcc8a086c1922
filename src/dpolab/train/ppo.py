"""The RLHF-PPO recipe (``dpolab ppo``): sample responses, score them, and improve the policy with clipped PPO.

Read :func:`train` top to bottom: the setup (from the blocks of :mod:`dpolab.train`), then per step — one
*rollout batch* of ``batch_size × processes`` prompts —

1. **rollout** (:func:`rollout`): ``samples_per_prompt`` responses per prompt from the policy (token ids,
   :func:`dpolab.engine.generate.sample_responses`; each response's randomness is a pure function of
   (seed, step, prompt position, sample), so a resumed or multi-process run samples what one uninterrupted
   process would); their rewards (:class:`RewardSource`); log π_old, V_old and log π_ref of every response
   token in one prefix-shared pass each (:func:`dpolab.engine.policy_value.rollout_outputs`);
2. **advantages** (:func:`advantages`): per-token rewards r_t = −β·KL_t, plus the response's reward on its
   last token (Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2), then GAE (Schulman et al. 2016) —
   or, with ``advantage: rloo``, the leave-one-out baseline over each prompt's k responses (Ahmadian et al.
   2024) and no critic; whitened over the whole batch (every process);
3. **update** (:func:`update`): ``ppo_epochs`` passes, each cut into ``minibatches`` optimiser steps, of the
   clipped surrogate + ``value_coef`` × the clipped value loss (:func:`dpolab.losses.ppo_losses`);

then log, evaluate (greedy responses to held-out prompts, their mean reward), checkpoint (:class:`dpolab.train.loop.Loop`). Losses are means
over the response tokens of the *global* minibatch (each process divides its token sum by the global count
÷ P, so DDP's average is the one-process value); minibatches are cut from one permutation of the global
batch's prompts, the same on every process.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from dpolab.data.formats import load_prompt_examples
from dpolab.data.tokenize import TokenizedPrompt, tokenize_prompts
from dpolab.engine.loading import check_vocabulary
from dpolab.engine.policy_value import PolicyWithValue, Rollout, RolloutEngine, mix
from dpolab.eval.judges import MathJudge, RewardModelJudge, RulesJudge
from dpolab.losses import gae, kl_estimate, masked_mean, ppo_policy_loss, ppo_value_loss, rloo_advantages, whiten
from dpolab.outputs import dumps
from dpolab.settings import PPOSettings
from dpolab.train import evaluation, ppo_monitor
from dpolab.train.accelerator import compute_dtype
from dpolab.train.config import TrainConfig
from dpolab.train.data_order import prepare_data
from dpolab.train.distributed import any_across, sum_across
from dpolab.train.lifecycle import Run, run_state
from dpolab.train.loop import Loop, start_run
from dpolab.train.models import (
    apply_lora,
    choose_engine,
    compile_layers,
    load_policy,
    load_reference,
    load_scalar_model,
)
from dpolab.train.run_folder import RunFolder, announce
from dpolab.train.step import Forward, add_sums, build_optimizer, optimizer_step, reduced_means, throughput

# --- the reward ----------------------------------------------------------------------------------


def same_vocabulary(first, second) -> bool:
    return first.get_vocab() == second.get_vocab()


class RewardSource:
    """The reward of each response: a reward model, the ``math`` judge, or format rules (:mod:`dpolab.eval.judges`).

    A response the judge cannot score (e.g. no text for the math judge) gets 0."""

    def __init__(self, settings: PPOSettings, config: TrainConfig, tokenizer, device) -> None:
        reward = settings.reward
        if "model" in reward:
            from transformers import AutoConfig

            from dpolab.engine.loading import load_tokenizer

            path = reward["model"]
            try:
                labels = AutoConfig.from_pretrained(path).num_labels
            except (OSError, ValueError) as error:
                raise ValueError(f"ppo.reward.model: cannot read the config of {path}: {str(error)[:200]}") from None
            if labels != 1:
                raise ValueError(
                    f"ppo.reward.model: {path} has {labels} labels; a reward model has one output (num_labels: 1)"
                )
            reward_tokenizer = load_tokenizer(path)
            if not same_vocabulary(tokenizer, reward_tokenizer) and not getattr(
                reward_tokenizer, "chat_template", None
            ):
                raise ValueError(
                    f"ppo.reward.model: {path} has another tokenizer than the policy and no chat template, so "
                    "dpolab cannot know how it was shown a prompt and a response; train the reward model on the "
                    "policy's tokenizer (dpolab rm --tokenizer POLICY) or give its tokenizer a chat template"
                )
            self.judge = RewardModelJudge(
                path, batch_size=config.batch_size * settings.samples_per_prompt, max_length=config.max_length or 4096,
                allow_pickle=config.allow_pickle, score_empty=True, device=device,
            )  # fmt: skip
        elif "judge" in reward:
            self.judge = MathJudge()
        else:
            self.judge = RulesJudge(reward["rules"])
        self.needs_answer = bool(getattr(self.judge, "needs_reference", False))
        self.name = self.judge.name

    def check_answers(self, prompts: list[TokenizedPrompt], source: str) -> None:
        """A reward that compares with the row's ``answer`` needs every prompt to have one."""
        missing = [p.row for p in prompts if p.answer is None]
        if self.needs_answer and missing:
            raise ValueError(
                f"{source}: the {self.name} reward compares each response with the row's 'answer', and "
                f"{len(missing)} rows have none (rows {', '.join(map(str, missing[:10]))})"
            )

    def scores(self, prompts: list[TokenizedPrompt], texts: list[str]) -> torch.Tensor:
        verdicts = self.judge.score([(p.prompt, t, p.answer) for p, t in zip(prompts, texts, strict=True)])
        return torch.tensor([v.score if v.score is not None else 0.0 for v in verdicts], dtype=torch.float32)


# --- the data order ----------------------------------------------------------------------------


class PromptStream:
    """The prompt order: a seeded shuffle per epoch, read as one endless sequence; step t takes its next
    ``per_step`` = batch_size × processes prompts (always full: the last batch of an epoch runs on into the
    next), and process r the positions r, r + P, … of them. The position is the whole state."""

    def __init__(self, size: int, per_step: int, seed: int) -> None:
        self.size, self.per_step, self.seed = size, per_step, seed
        self.consumed = 0

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_step(self) -> tuple[list[int], int]:
        """(the step's prompts, in global order; the epoch its first prompt belongs to)."""
        start = self.consumed * self.per_step
        self.consumed += 1
        orders: dict[int, list[int]] = {}
        prompts = []
        for position in range(start, start + self.per_step):
            epoch = position // self.size
            if epoch not in orders:
                orders[epoch] = self.order(epoch)
            prompts.append(orders[epoch][position % self.size])
        return prompts, start // self.size

    def state_dict(self) -> dict:
        return {"steps": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["steps"]


@dataclass
class PhaseTimes:
    """Seconds spent in each phase over the run (every resume adds to them): the PPO time split."""

    seconds: dict = field(default_factory=lambda: {"generation": 0.0, "reward": 0.0, "logps": 0.0, "update": 0.0})

    def state_dict(self) -> dict:
        return dict(self.seconds)

    def load_state_dict(self, state: dict) -> None:
        self.seconds = dict(state)


# --- setup ---------------------------------------------------------------------------------------


@dataclass
class Setup(Run):
    """Everything the loop reads, built by :func:`setup`."""

    settings: PPOSettings
    prompts: list[TokenizedPrompt]
    eval_prompts: list[TokenizedPrompt]
    reward: RewardSource
    reference: torch.nn.Module | None  # None: LoRA, the reference is the policy with its adapter off
    pad_token_id: int
    eos_token_id: int
    phases: PhaseTimes
    rollouts: RolloutEngine  # sampling and the per-token passes, bound to this run's settings
    probes: ppo_monitor.PPOProbes | None = None  # the 3D monitor (set once the model is wrapped)


def load_critic(config: TrainConfig, settings: PPOSettings, pad_token_id: int, log):
    """The separate critic of ``value_model: DIR``, loaded as a reward model is (a new head on a causal LM)."""
    if settings.value_model in ("head", "none"):
        return None
    critic = load_scalar_model(replace(config, model=settings.value_model), pad_token_id, log)
    return apply_lora(critic, config.lora, task_type="SEQ_CLS") if config.lora else critic


def setup(config: TrainConfig, accelerator, folder: RunFolder) -> Setup:
    """Data, reward, policy with its critic, reference, optimiser, prompt order, checkpointer."""
    announce(folder, accelerator, config, "ppo")
    settings = config.ppo
    data = prepare_data(config, accelerator, folder, load_prompt_examples, tokenize_prompts)
    tokenizer, pad_token_id, log = data.tokenizer, data.pad_token_id, folder.log
    per_step = config.batch_size * accelerator.num_processes
    if settings.minibatches > per_step:
        raise ValueError(
            f"ppo.minibatches: {settings.minibatches} minibatches of a rollout batch of {per_step} prompts "
            "(batch_size × processes) leave some empty; use at most that many"
        )
    reward = RewardSource(settings, config, tokenizer, accelerator.device)  # refuses a bad reward model first
    reward.check_answers(data.items, config.data)
    reward.check_answers(data.eval_items, config.eval_data or config.data)
    monitor_pairs = ppo_monitor.load_pairs(config, tokenizer, log)  # bad pairs fail before any model loads
    log.info(f"reward: {reward.name}; advantage: {settings.advantage}; critic: {settings.value_model}")

    policy = load_policy(config)
    reference = load_reference(config, policy)
    if config.lora:
        policy = apply_lora(policy, config.lora)
    critic = load_critic(config, settings, pad_token_id, log)
    if critic is not None:  # it reads the policy's token ids
        check_vocabulary(critic, tokenizer, settings.value_model, config.tokenizer or config.model)
    model = PolicyWithValue(policy, critic, value_head=settings.value_model == "head").to(accelerator.device)
    if reference is not None:
        reference.to(accelerator.device)
    dtype = compute_dtype(accelerator, policy.dtype)
    probe = [Rollout(p.prompt_ids, (p.prompt_ids[-4:],)) for p in data.items[:4]]  # any text checks the mask
    engine, fallback = choose_engine(config, policy, probe, pad_token_id, accelerator, dtype, log)
    compile_layers(config, policy, log)
    steps = config.max_steps or max(1, math.ceil(config.epochs * len(data.items) / per_step))
    optimizer, scheduler = build_optimizer(config, model, steps * settings.ppo_epochs * settings.minibatches)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    stream = PromptStream(len(data.items), per_step, config.seed)
    state = run_state(config, accelerator, folder, model, data.items, stream=stream)
    phases = PhaseTimes()
    state["checkpointer"].register("phase_seconds", phases)
    unwrapped = accelerator.unwrap_model(model)
    rollouts = RolloutEngine(
        decode=lambda **inputs: unwrapped(mode="decode", **inputs),  # the module's own call: FSDP gathers shards
        pad_token_id=pad_token_id, eos_token_id=tokenizer.eos_token_id, device=accelerator.device,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        naive=engine.naive, row_tokens=config.row_tokens, kernel=engine.kernel,
        keep_going=(lambda still: any_across(accelerator, still)) if accelerator.distributed_type.value == "FSDP"
        else None,
    )  # fmt: skip
    s = Setup(
        config=config, accelerator=accelerator, folder=folder, model=model, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=engine, fallback=fallback, total_steps=steps,
        data_report=data.report, settings=settings, prompts=data.items, eval_prompts=data.eval_items, reward=reward,
        reference=reference, pad_token_id=pad_token_id, eos_token_id=tokenizer.eos_token_id, phases=phases,
        rollouts=rollouts, **state,
    )  # fmt: skip
    s.probes = ppo_monitor.setup(s, monitor_pairs, [p.prompt_ids for p in (data.eval_items or data.items)])
    if s.probes is not None:
        state["checkpointer"].register("monitor", s.probes.monitor)
    return s


# --- 1. rollout ----------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """This process's share of one rollout batch; per-token tensors are (responses, longest response)."""

    prompts: list[TokenizedPrompt]
    positions: list[int]  # each prompt's position in the global batch
    items: list[Rollout]
    texts: list[str]  # per response (prompt-major: prompt i's k responses are i·k … i·k + k − 1)
    scores: torch.Tensor  # (responses,) the reward source's score
    rewards: torch.Tensor  # (responses,) the score less the missing-EOS penalty
    finished: torch.Tensor  # (responses,) reached an EOS
    mask: torch.Tensor
    logps: torch.Tensor  # log π_old
    reference_logps: torch.Tensor
    values: torch.Tensor | None  # V_old
    entropy: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # per token, the configured estimator


def rollout(s: Setup, step: int, global_prompts: list[int]) -> RolloutBatch:
    """Sample, score, and read log π_old, V_old, log π_ref of this process's prompts of the step."""
    settings, accelerator, k = s.settings, s.accelerator, s.settings.samples_per_prompt
    rank, processes = accelerator.process_index, accelerator.num_processes
    positions = list(range(rank, len(global_prompts), processes))
    prompts = [s.prompts[global_prompts[p]] for p in positions]
    unwrapped = accelerator.unwrap_model(s.model)
    unwrapped.eval()
    clock = time.perf_counter()
    expanded = [p for p in prompts for _ in range(k)]
    seeds = [mix(s.config.seed, step, p, j) for p in positions for j in range(k)]
    with accelerator.autocast():
        samples = s.rollouts.generate([p.prompt_ids for p in expanded], seeds)
    tick = time.perf_counter()
    s.phases.seconds["generation"] += tick - clock
    texts = s.tokenizer.batch_decode([list(sample.ids) for sample in samples], skip_special_tokens=True)
    scores = s.reward.scores(expanded, texts).to(accelerator.device)
    finished = torch.tensor([sample.finished for sample in samples], device=accelerator.device)
    penalty = settings.missing_eos_penalty or 0.0
    rewards = scores - penalty * (~finished).to(scores.dtype)
    clock = time.perf_counter()
    s.phases.seconds["reward"] += clock - tick
    items = [Rollout(p.prompt_ids, tuple(samples[i * k + j].ids for j in range(k))) for i, p in enumerate(prompts)]
    with torch.no_grad(), accelerator.autocast():
        old = s.rollouts.token_pass(unwrapped, items, entropy=True)
        if s.reference is not None:
            reference = s.rollouts.token_pass(s.reference, items)
        else:
            reference = s.rollouts.token_pass(unwrapped, items, mode="reference")
    unwrapped.train()
    s.phases.seconds["logps"] += time.perf_counter() - clock
    return RolloutBatch(
        prompts=prompts, positions=positions, items=items, texts=texts, scores=scores, rewards=rewards,
        finished=finished, mask=old.mask(), logps=old.dense(old.logps), reference_logps=old.dense(reference.logps),
        values=old.dense(old.values) if old.values is not None else None, entropy=old.dense(old.entropy),
    )  # fmt: skip


# --- 2. advantages ---------------------------------------------------------------------------------


def global_moments(accelerator, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``values`` over the masked positions of every process."""
    total, squares, count = sum_across(
        accelerator, [float((values * mask).sum()), float((values**2 * mask).sum()), float(mask.sum())]
    )
    mean = total / max(count, 1.0)
    variance = max(squares / max(count, 1.0) - mean**2, 0.0)
    return torch.tensor(mean, dtype=values.dtype), torch.tensor(variance, dtype=values.dtype)


def advantages(s: Setup, batch: RolloutBatch) -> None:
    """Per-token rewards, then the advantages (and GAE's returns), whitened over the global batch."""
    settings, mask = s.settings, batch.mask
    batch.kl = kl_estimate(batch.logps, batch.reference_logps, settings.kl_estimator) * mask
    rewards = -settings.kl_coef * batch.kl if settings.kl_in == "reward" else torch.zeros_like(mask)
    last = mask.sum(1).long() - 1
    rewards = rewards.index_put((torch.arange(len(last), device=mask.device), last), batch.rewards, accumulate=True)
    if settings.whiten_rewards:
        mean, variance = global_moments(s.accelerator, rewards, mask)
        rewards = whiten(rewards, mask, shift_mean=False, mean=mean, variance=variance)
    if settings.advantage == "gae":
        batch.advantages, batch.returns = gae(rewards, batch.values, mask, settings.gamma, settings.lam)
    else:
        per_response = rloo_advantages(rewards.sum(1).view(-1, settings.samples_per_prompt)).reshape(-1)
        batch.advantages = per_response[:, None] * mask
    if settings.whiten_advantages:
        mean, variance = global_moments(s.accelerator, batch.advantages, mask)
        batch.advantages = whiten(batch.advantages, mask, mean=mean, variance=variance)


def rollout_metrics(s: Setup, batch: RolloutBatch) -> dict[str, float]:
    """Means over every process's responses (and tokens) of the rollout batch."""
    lengths = batch.mask.sum(1)
    per_response = {
        "rewards/mean": batch.rewards,
        "rewards/squared": batch.rewards**2,
        "scores/mean": batch.scores,
        "kl": batch.kl.sum(1),
        "response_length": lengths,
        "no_eos_fraction": (~batch.finished).float(),
    }
    sums: dict[str, float] = {}
    add_sums(sums, per_response)
    metrics = reduced_means(s.accelerator, sums, len(lengths))
    metrics["rewards/std"] = math.sqrt(max(metrics.pop("rewards/squared") - metrics["rewards/mean"] ** 2, 0.0))
    tokens = {"entropy": batch.entropy}
    if batch.returns is not None:  # explained variance of the rollout's values: 1 − Var(R − V) / Var(R)
        tokens.update(returns=batch.returns, returns_squared=batch.returns**2, error=batch.returns - batch.values)
        tokens["error_squared"] = tokens["error"] ** 2
    names = sorted(tokens)
    totals = sum_across(
        s.accelerator, [float((tokens[n] * batch.mask).sum()) for n in names] + [float(batch.mask.sum())]
    )
    means = {n: t / max(totals[-1], 1.0) for n, t in zip(names, totals, strict=False)}
    metrics["entropy"] = means["entropy"]
    if batch.returns is not None:
        returns_variance = means["returns_squared"] - means["returns"] ** 2
        error_variance = means["error_squared"] - means["error"] ** 2
        metrics["explained_variance"] = 1 - error_variance / returns_variance if returns_variance > 0 else float("nan")
    return metrics


# --- 3. update -------------------------------------------------------------------------------------


def minibatch_of(batch: RolloutBatch, positions: list[int]) -> tuple[list[int], bool]:
    """This process's prompts (indices into the batch) among the global ``positions``; (stand-in [0], False) if none."""
    index = {p: i for i, p in enumerate(batch.positions)}
    mine = [index[p] for p in positions if p in index]
    return (mine, True) if mine else ([0], False)


def minibatch_loss(s: Setup, batch: RolloutBatch, local: list[int], real: bool) -> tuple[torch.Tensor, dict]:
    """The PPO loss of one minibatch's share on this process, normalised by the global minibatch's tokens."""
    settings, k = s.settings, s.settings.samples_per_prompt
    with s.accelerator.autocast():
        outputs = s.rollouts.token_pass(s.model, [batch.items[i] for i in local], entropy=True)
    rows = torch.tensor([i * k + j for i in local for j in range(k)], device=batch.mask.device)
    mask = outputs.mask()
    width = mask.shape[1]

    def old(values: torch.Tensor) -> torch.Tensor:
        return values[rows, :width]

    local_tokens = float(mask.sum()) if real else 0.0
    count = max(sum_across(s.accelerator, [local_tokens])[0], 1.0) / s.accelerator.num_processes
    logps = outputs.dense(outputs.logps)
    loss, clip_fraction, approx_kl = ppo_policy_loss(
        logps, old(batch.logps), old(batch.advantages), mask, settings.clip_range, count
    )
    terms = {"loss/policy": loss.detach(), "clip_fraction": clip_fraction, "approx_kl": approx_kl}
    if batch.returns is not None:
        values = outputs.dense(outputs.values)
        value_loss, value_clip = ppo_value_loss(
            values, old(batch.values), old(batch.returns), mask, settings.value_clip_range, count
        )
        loss = loss + settings.value_coef * value_loss
        terms.update({"loss/value": value_loss.detach(), "value_clip_fraction": value_clip})
    if settings.kl_in == "loss":
        kl = masked_mean(kl_estimate(logps, old(batch.reference_logps), settings.kl_estimator), mask, count)
        loss = loss + settings.kl_coef * kl
        terms["loss/kl"] = kl.detach()
    if settings.entropy_coef:
        loss = loss - settings.entropy_coef * masked_mean(outputs.dense(outputs.entropy), mask, count)
    return loss * float(real), {name: float(value) * float(real) for name, value in terms.items()}


def update(s: Setup, step: int, batch: RolloutBatch) -> tuple[dict[str, float], str | None]:
    """``ppo_epochs`` passes over the batch, ``minibatches`` optimiser steps each; the mean metrics of the
    updates (over every process), and why the run must stop (a non-finite update) or None."""
    settings, accelerator = s.settings, s.accelerator
    size = len(batch.positions) * accelerator.num_processes
    sums: dict[str, float] = {}
    norms, updates = [], 0
    rows = [p.row for p in batch.prompts]
    for epoch in range(settings.ppo_epochs):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(mix(s.config.seed, step, epoch))).tolist()
        for m in range(settings.minibatches):
            chunk = order[m * size // settings.minibatches : (m + 1) * size // settings.minibatches]
            local, real = minibatch_of(batch, chunk)
            loss, terms = minibatch_loss(s, batch, local, real)
            accelerator.backward(loss)
            grad_norm, learning_rate, nonfinite = optimizer_step(s, step, bool(torch.isfinite(loss)), rows)
            if nonfinite:
                return {}, nonfinite
            norms.append(grad_norm)
            updates += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
    names = sorted(sums)
    # Each local value is (its token sum) × P / (global tokens): the P of them add up to P × the global mean.
    totals = sum_across(accelerator, [sums[n] for n in names])
    metrics = {name: total / (updates * accelerator.num_processes) for name, total in zip(names, totals, strict=True)}
    metrics.update(grad_norm=sum(norms) / len(norms), learning_rate=learning_rate)
    return metrics, None


# --- logging and evaluation ------------------------------------------------------------------------


def log_samples(s: Setup, step: int, batch: RolloutBatch) -> None:
    """The first responses of this step's rollout (main process) in samples.jsonl and the log."""
    if not s.accelerator.is_main_process or not s.settings.samples_logged:
        return
    from dpolab.data.onpolicy import prompt_text

    k = s.settings.samples_per_prompt
    with open(s.folder.path / "samples.jsonl", "a", encoding="utf-8") as handle:
        for index in range(min(s.settings.samples_logged, len(batch.texts))):
            prompt = batch.prompts[index // k]
            row = {
                "step": step, "row": prompt.row, "prompt": prompt.prompt, "response": batch.texts[index],
                "reward": float(batch.rewards[index]), "score": float(batch.scores[index]),
                "finished": bool(batch.finished[index]),
            }  # fmt: skip
            handle.write(dumps(row, s.folder.log.info, source="samples.jsonl", ensure_ascii=False) + "\n")
            s.folder.log.info(
                f"sample at step {step}: {prompt_text(prompt.prompt)[-60:]!r} → {batch.texts[index][:80]!r} "
                f"(reward {row['reward']:.3f})"
            )


def evaluate(s: Setup, step: int) -> dict:
    """Greedy responses to the held-out prompts: their mean reward, length and share without an EOS (``eval/``)."""

    def forward(ids: list[int], real: bool) -> Forward:
        prompts = [s.eval_prompts[i] for i in ids]
        with s.accelerator.autocast():  # generation runs on every process (a collective forward under FSDP)
            samples = s.rollouts.generate([p.prompt_ids for p in prompts], seeds=None)
        texts = s.tokenizer.batch_decode([list(sample.ids) for sample in samples], skip_special_tokens=True)
        values = {
            "rewards/mean": s.reward.scores(prompts, texts) if real else torch.zeros(len(ids)),
            "response_length": torch.tensor([float(len(sample.ids)) for sample in samples]),
            "no_eos_fraction": torch.tensor([float(not sample.finished) for sample in samples]),
        }
        return Forward(torch.zeros(len(ids)), values)

    return evaluation.evaluate(s, step, len(s.eval_prompts), forward, {"rewards/mean": "greedy reward"})


def peak_memory_mib(device) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# --- the loop --------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """RLHF-PPO with ``config``; returns the summary (also written to output_dir/summary.json).

    ``resume`` and ``overwrite`` as in :func:`dpolab.train.preference.train`.
    """
    with start_run(config, resume, overwrite, setup) as s:
        loop = Loop(s, "ppo", partial(evaluate, s), s.accelerator.unwrap_model(s.model).policy, title="ppo")
        with loop:
            for step in loop.steps():
                global_prompts, epoch = s.stream.next_step()
                batch = rollout(s, step, global_prompts)
                advantages(s, batch)
                metrics = rollout_metrics(s, batch)
                clock = time.perf_counter()
                update_metrics, nonfinite = update(s, step, batch)
                s.phases.seconds["update"] += time.perf_counter() - clock
                metrics.update(update_metrics, epoch=epoch + 1)
                tokens = sum(item.unique_tokens for item in batch.items)
                metrics.update(throughput(s, len(batch.prompts), tokens, "prompts"))
                metrics.update({f"time/{phase}": seconds for phase, seconds in s.phases.seconds.items()})
                alarms = []
                if s.probes is not None and not nonfinite:  # the 3D monitor on held-out pairs (ppo_monitor.py)
                    metrics.update(ppo_monitor.step_metrics(s, step))
                    alarms = s.probes.monitor.update(step, metrics)
                on_alarm = s.probes.settings.on_alarm if s.probes else None
                loop.record(step, metrics, {"reward": metrics["rewards/mean"], "kl": metrics["kl"]}, alarms, on_alarm)
                if step % s.settings.sample_steps == 0 or step == 1:
                    log_samples(s, step, batch)
                loop.end_step(step, nonfinite)
        monitor = s.probes.monitor if s.probes else None
        return loop.finish(
            "prompts", stopped_by_alarm=loop.stopped_by_alarm, alarms=monitor.alarms if monitor else [],
            monitor=monitor.state_dict() if monitor else None, phase_seconds=dict(s.phases.seconds),
            **peak_memory_mib(s.accelerator.device),
        )  # fmt: skip
