"""Prefix-shared packing: each item (a prompt with its branches) is laid out once as [prompt | branch 1 | …].

A preference pair has two branches (chosen, rejected): [prompt | chosen | rejected]. An SFT example
has one: [prompt | completion]. Position ids restart after the prompt for each branch (branch b:
P…P+len(b)−1). The attention rule inside a row is: token i sees token j iff both belong to the same
item, j ≤ i, and j is a prompt token or of i's own branch, so the rejected branch never sees the
chosen one. Several items share a row up to ``row_tokens``; rows are padded to the longest row of the
micro-batch only.

The log-prob of branch token k is read at its *predecessor*: the last prompt token for k = 0, else
branch token k − 1 of the same branch. :class:`PackedBatch` carries those positions, so the LM head
runs at completion positions only; a reward model reads its score at each branch's last token
(``branch_end_positions``). Sequence s = item × branches + branch numbers every (prompt,
branch) sequence of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

PROMPT = 0  # branch id of prompt tokens; branch b (0-based) has id b + 1
CHOSEN, REJECTED = 1, 2


class Item(Protocol):
    """What the packer needs: :class:`~dpolab.data.tokenize.TokenizedPair` and ``TokenizedSequence`` have it."""

    prompt_ids: tuple[int, ...]

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]: ...

    @property
    def unique_tokens(self) -> int: ...


@dataclass
class PackedBatch:
    """Tensors for one micro-batch of ``num_items`` items packed into ``input_ids.shape[0]`` rows."""

    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length)
    segment_ids: torch.Tensor  # (rows, length): item slot within the row, −1 on padding
    branch_ids: torch.Tensor  # (rows, length): PROMPT, or branch number + 1
    predict_positions: torch.Tensor  # (n,) flat index (row * length + column) whose output predicts the target
    target_ids: torch.Tensor  # (n,) the completion token predicted there
    target_sequence: torch.Tensor  # (n,) sequence number: item index in the micro-batch × branches + branch
    target_index: torch.Tensor  # (n,) the token's index within its branch (0-based)
    branch_lengths: torch.Tensor  # (num_items, branches) completion token counts
    item_ids: torch.Tensor  # (num_items,) index of each item in the data set
    branch_end_positions: torch.Tensor  # (num_items × branches,) flat index of each sequence's last token

    @property
    def num_items(self) -> int:
        return int(self.branch_lengths.shape[0])

    @property
    def num_branches(self) -> int:
        return int(self.branch_lengths.shape[1])

    @property
    def chosen_lengths(self) -> torch.Tensor:
        return self.branch_lengths[:, 0]

    @property
    def rejected_lengths(self) -> torch.Tensor:
        return self.branch_lengths[:, 1]

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    def to(self, device) -> PackedBatch:
        return PackedBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4D mask (rows, 1, length, length): 0 where attention is allowed, the dtype's minimum elsewhere."""
        length = self.input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.input_ids.device).tril()
        same_item = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        key_branch = self.branch_ids[:, None, :]
        visible_branch = (key_branch == PROMPT) | (key_branch == self.branch_ids[:, :, None])
        allowed = causal[None] & same_item & visible_branch & (self.segment_ids[:, None, :] >= 0)
        # Padding queries attend to themselves so no softmax row is empty (their outputs are never read).
        allowed |= torch.eye(length, dtype=torch.bool, device=allowed.device)[None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def plan_rows(items: list[Item], row_tokens: int) -> list[list[int]]:
    """Items into rows of at most ``row_tokens`` tokens: as few rows as first-fit decreasing needs, then balanced.

    Every row is padded to the longest, so after counting the rows the items are placed largest first
    into the least-filled row that holds them: rows come out of similar length and padding is small.
    An item longer than ``row_tokens`` gets a row of its own. Each row lists its items in index order.
    """
    sizes = [item.unique_tokens for item in items]
    largest_first = sorted(range(len(items)), key=lambda i: (-sizes[i], i))
    count = len(_first_fit(largest_first, sizes, row_tokens))
    rows: list[list[int]] = [[] for _ in range(count)]
    used = [0] * count
    for index in largest_first:
        fitting = [row for row in range(len(rows)) if used[row] + sizes[index] <= row_tokens]
        if fitting:
            row = min(fitting, key=lambda r: (used[r], r))
        else:  # longer than a row, or the balanced placement left no room: a new row
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(index)
        used[row] += sizes[index]
    return [sorted(row) for row in rows if row]


def _first_fit(order: list[int], sizes: list[int], row_tokens: int) -> list[list[int]]:
    rows: list[list[int]] = []
    used: list[int] = []
    for index in order:
        for row, filled in enumerate(used):
            if filled + sizes[index] <= row_tokens:
                rows[row].append(index)
                used[row] += sizes[index]
                break
        else:
            rows.append([index])
            used.append(sizes[index])
    return rows


def pack(items: list[Item], item_ids: list[int], row_tokens: int, pad_token_id: int) -> PackedBatch:
    """Pack a micro-batch of items into rows; see the module docstring for the layout."""
    branches = len(items[0].branches)
    if any(len(item.branches) != branches for item in items):
        raise ValueError("every item of a micro-batch must have the same number of branches")
    rows = plan_rows(items, row_tokens)
    length = max(sum(items[i].unique_tokens for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    # Per item, so the targets come out in sequence order whatever row each item landed in.
    predict: list[list[int]] = [[] for _ in items]
    branch_end = [0] * (len(items) * branches)
    for row_number, row in enumerate(rows):
        column = 0
        for slot, index in enumerate(row):
            item = items[index]
            prompt_length = len(item.prompt_ids)
            last_prompt = row_number * length + column + prompt_length - 1
            layout = [(PROMPT, item.prompt_ids)] + [(b + 1, ids) for b, ids in enumerate(item.branches)]
            for branch, ids in layout:
                n = len(ids)
                span = slice(column, column + n)
                input_ids[row_number, span] = torch.tensor(ids, dtype=torch.long)
                start = 0 if branch == PROMPT else prompt_length
                position_ids[row_number, span] = torch.arange(start, start + n)
                segment_ids[row_number, span] = slot
                branch_ids[row_number, span] = branch
                if branch != PROMPT and n > 0:
                    flat = row_number * length + column
                    predict[index].extend([last_prompt] + [flat + k for k in range(n - 1)])
                    branch_end[index * branches + branch - 1] = flat + n - 1
                column += n
    targets = [token for item in items for ids in item.branches for token in ids]
    target_sequence = [s for s, ids in enumerate(ids for item in items for ids in item.branches) for _ in ids]
    target_index = [k for item in items for ids in item.branches for k in range(len(ids))]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        branch_ids=branch_ids,
        predict_positions=torch.tensor([p for positions in predict for p in positions], dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        target_sequence=torch.tensor(target_sequence, dtype=torch.long),
        target_index=torch.tensor(target_index, dtype=torch.long),
        branch_lengths=torch.tensor([[len(ids) for ids in item.branches] for item in items], dtype=torch.long),
        item_ids=torch.tensor(item_ids, dtype=torch.long),
        branch_end_positions=torch.tensor(branch_end, dtype=torch.long),
    )
