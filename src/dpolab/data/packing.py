"""Prefix-shared packing: each pair is laid out once as [prompt | chosen | rejected].

Position ids restart after the prompt for each branch (chosen: P…P+C−1, rejected: P…P+R−1). The
attention rule inside a row is: token i sees token j iff both belong to the same pair, j ≤ i, and j is
a prompt token or of i's own branch, so rejected tokens never see chosen ones. Several pairs share a
row up to ``row_tokens``; rows are padded to the longest row of the micro-batch only.

The log-prob of completion token k is read at its *predecessor*: the last prompt token for k = 0,
else completion token k − 1 of the same branch. :class:`PackedBatch` carries those positions, so the
LM head runs at completion positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpolab.data.tokenize import TokenizedPair

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedBatch:
    """Tensors for one micro-batch of ``num_pairs`` pairs packed into ``input_ids.shape[0]`` rows."""

    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length)
    segment_ids: torch.Tensor  # (rows, length): pair slot within the row, −1 on padding
    branch_ids: torch.Tensor  # (rows, length): PROMPT / CHOSEN / REJECTED
    predict_positions: torch.Tensor  # (n,) flat index (row * length + column) whose output predicts the target
    target_ids: torch.Tensor  # (n,) the completion token predicted there
    target_pair: torch.Tensor  # (n,) index of the pair in the micro-batch
    target_is_chosen: torch.Tensor  # (n,) bool
    target_index: torch.Tensor  # (n,) the token's index within its completion (0-based)
    chosen_lengths: torch.Tensor  # (num_pairs,)
    rejected_lengths: torch.Tensor  # (num_pairs,)
    pair_ids: torch.Tensor  # (num_pairs,) index of each pair in the data set

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_lengths.shape[0])

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    def to(self, device) -> PackedBatch:
        return PackedBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4D mask (rows, 1, length, length): 0 where attention is allowed, the dtype's minimum elsewhere."""
        length = self.input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.input_ids.device).tril()
        same_pair = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        key_branch = self.branch_ids[:, None, :]
        visible_branch = (key_branch == PROMPT) | (key_branch == self.branch_ids[:, :, None])
        allowed = causal[None] & same_pair & visible_branch & (self.segment_ids[:, None, :] >= 0)
        # Padding queries attend to themselves so no softmax row is empty (their outputs are never read).
        allowed |= torch.eye(length, dtype=torch.bool, device=allowed.device)[None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def plan_rows(pairs: list[TokenizedPair], row_tokens: int) -> list[list[int]]:
    """Greedy first-fit of pairs (in the given order) into rows of at most ``row_tokens`` tokens.

    A pair longer than ``row_tokens`` gets a row of its own.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    for index, pair in enumerate(pairs):
        size = pair.unique_tokens
        for row, filled in enumerate(used):
            if filled + size <= row_tokens:
                rows[row].append(index)
                used[row] += size
                break
        else:
            rows.append([index])
            used.append(size)
    return rows


def pack(pairs: list[TokenizedPair], pair_ids: list[int], row_tokens: int, pad_token_id: int) -> PackedBatch:
    """Pack a micro-batch of pairs into rows; see the module docstring for the layout."""
    rows = plan_rows(pairs, row_tokens)
    length = max(sum(pairs[i].unique_tokens for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    predict, targets, target_pair, target_chosen, target_index = [], [], [], [], []
    for row_number, row in enumerate(rows):
        column = 0
        for slot, index in enumerate(row):
            pair = pairs[index]
            prompt_length = len(pair.prompt_ids)
            last_prompt = row_number * length + column + prompt_length - 1
            layout = [(PROMPT, pair.prompt_ids), (CHOSEN, pair.chosen_ids), (REJECTED, pair.rejected_ids)]
            for branch, ids in layout:
                n = len(ids)
                span = slice(column, column + n)
                input_ids[row_number, span] = torch.tensor(ids)
                start = 0 if branch == PROMPT else prompt_length
                position_ids[row_number, span] = torch.arange(start, start + n)
                segment_ids[row_number, span] = slot
                branch_ids[row_number, span] = branch
                if branch != PROMPT and n > 0:  # an empty branch (SFT's rejected) predicts nothing
                    flat = row_number * length + column
                    predict.extend([last_prompt] + [flat + k for k in range(n - 1)])
                    targets.extend(ids)
                    target_pair.extend([index] * n)
                    target_chosen.extend([branch == CHOSEN] * n)
                    target_index.extend(range(n))
                column += n
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        branch_ids=branch_ids,
        predict_positions=torch.tensor(predict, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        target_pair=torch.tensor(target_pair, dtype=torch.long),
        target_is_chosen=torch.tensor(target_chosen, dtype=torch.bool),
        target_index=torch.tensor(target_index, dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
        pair_ids=torch.tensor(pair_ids, dtype=torch.long),
    )
