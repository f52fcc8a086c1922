"""Attention over prefix-shared packed rows without a dense mask: what each kernel computes and how it is installed.

A packed row holds several items, each ``[prompt | branch 1 | branch 2 …]`` (:mod:`dpolab.data.packing`).
Token i sees token j iff both belong to the same item, j ≤ i, and j is a prompt token or of i's own branch.
With a dense ``(rows, 1, L, L)`` mask every query pays for every key of the row, pairs it cannot see
included, and no fused kernel takes the mask, so the cost of a row grows with L², not with its items.
Three kernels compute the same attention:

- ``segments`` (any device, with gradients): one ``scaled_dot_product_attention`` per item, on that item's
  tokens only, with the item's own small mask (or ``is_causal`` when the item has a single branch, the
  varlen case of SFT and reward rows). The cost is Σ items n², whatever the row length.
- ``flex`` (CUDA): a FlexAttention :class:`BlockMask` of the same rule, so fully masked blocks are
  skipped by the fused kernel (PyTorch's FlexAttention has no backward on CPU; there it serves no-grad
  passes only).
- ``dense``: the additive 4D mask of :meth:`PackedBatch.attention_mask`, through the model's own kernel.

Hugging Face models choose their attention function by the name in ``config._attn_implementation``;
:func:`install` registers ``dpolab+<base>`` (base: the model's own implementation, e.g. ``sdpa``) and sets
it. The registered function looks at the mask it receives: a *layout tensor* (:func:`layout_mask`) runs
``segments``, a ``BlockMask`` runs ``flex``, anything else goes to the base implementation unchanged,
so generation and the naive path behave exactly as before. The layout travels as the attention mask,
not as a global, so gradient checkpointing's recomputation and any wrapper see the same thing.
The base name is what ``save_pretrained`` would write (``_attn_implementation`` is not serialised).
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
import torch.nn.functional as F

from dpolab.data.packing import PROMPT, PackedBatch

Kernel = Literal["segments", "flex", "dense"]
PREFIX = "dpolab+"
LAYOUT_FIELDS = 2  # segment ids, branch ids


def layout_mask(batch: PackedBatch) -> torch.Tensor:
    """The layout tensor ``(rows, 1, 2, L)`` (int64: segment ids, branch ids) that the ``segments`` kernel reads.

    It is 4D, so Hugging Face's mask creation passes it through as an already prepared mask."""
    return torch.stack([batch.segment_ids, batch.branch_ids], dim=1)[:, None]


def is_layout(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.long and mask.dim() == 4 and mask.shape[2] == 2


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def block_mask(batch: PackedBatch, block_size: int = 128):
    """The FlexAttention ``BlockMask`` of the packed rows (the rule in the module docstring).

    Padding queries see themselves, as in the dense mask, so no softmax row is empty. On CUDA the block
    table is built by a compiled kernel, without materialising the L × L mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    segments, branches = batch.segment_ids, batch.branch_ids

    def allowed(row, head, query, key):  # noqa: ARG001 - FlexAttention's mask_mod signature
        same_item = (segments[row, query] == segments[row, key]) & (segments[row, key] >= 0)
        visible = (branches[row, key] == PROMPT) | (branches[row, key] == branches[row, query])
        return ((query >= key) & same_item & visible) | (query == key)

    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    return create_block_mask(
        allowed,
        B=rows,
        H=None,
        Q_LEN=length,
        KV_LEN=length,
        device=device,
        BLOCK_SIZE=block_size,
        _compile=device.type == "cuda",
    )


def item_spans(layout: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) columns of each item: maximal runs of one segment id ≥ 0."""
    segments = layout[:, 0, 0]
    rows, length = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts &= segments >= 0
    ends = torch.ones_like(starts)
    ends[:, :-1] = segments[:, :-1] != segments[:, 1:]
    ends &= segments >= 0
    spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    start_rows, start_columns = starts.nonzero(as_tuple=True)
    _, end_columns = ends.nonzero(as_tuple=True)  # row-major: the k-th end closes the k-th start
    for row, start, end in zip(start_rows.tolist(), start_columns.tolist(), end_columns.tolist(), strict=True):
        spans[row].append((start, end + 1))
    return spans


def item_mask(
    branches: torch.Tensor, positions: torch.Tensor | None, sliding_window: int | None
) -> torch.Tensor | None:
    """The (n, n) boolean mask of one item, or None when plain causal attention is exact (one branch, no window)."""
    if sliding_window is None and int(branches.max()) <= 1:
        return None
    n = branches.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=branches.device).tril()
    allowed = causal & ((branches[None, :] == PROMPT) | (branches[None, :] == branches[:, None]))
    if sliding_window is not None:  # Hugging Face's rule: key visible iff query position − key position < window
        allowed &= (positions[:, None] - positions[None, :]) < sliding_window
    return allowed


def segments_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: torch.Tensor,
    scaling: float | None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed rows item by item; (rows, L, heads, dim) as Hugging Face attention functions return.

    ``query`` is (rows, heads, L, dim); ``key``/``value`` may have fewer heads (grouped-query attention).
    Padding columns get zeros: no real token attends to them, and their outputs are never read."""
    rows, heads, length, dim = query.shape
    grouped = key.shape[1] != heads
    outputs = []
    for row, items in enumerate(item_plan(layout, positions, sliding_window)):
        pieces, column = [], 0
        for start, end, mask in items:
            if start > column:
                pieces.append(query.new_zeros(1, heads, start - column, dim))
            pieces.append(
                F.scaled_dot_product_attention(
                    query[row : row + 1, :, start:end],
                    key[row : row + 1, :, start:end],
                    value[row : row + 1, :, start:end],
                    attn_mask=mask,
                    is_causal=mask is None,
                    dropout_p=dropout,
                    scale=scaling,
                    enable_gqa=grouped,
                )
            )
            column = end
        if column < length:
            pieces.append(query.new_zeros(1, heads, length - column, dim))
        outputs.append(torch.cat(pieces, dim=2))
    return torch.cat(outputs, dim=0).transpose(1, 2).contiguous()


def item_plan(layout: torch.Tensor, positions: torch.Tensor | None, sliding_window: int | None):
    """Per row, each item's (start, end, mask). Worked out once per forward: every layer (and a checkpointed
    layer's recomputation) receives the same layout tensor, which keeps the plan as an attribute."""
    plans = layout.__dict__.setdefault("_dpolab_plans", {})
    if sliding_window not in plans:
        plans[sliding_window] = [
            [
                (start, end, item_mask(
                    layout[row, 0, 1, start:end], None if positions is None else positions[row, start:end],
                    sliding_window,
                ))
                for start, end in spans
            ]
            for row, spans in enumerate(item_spans(layout))
        ]  # fmt: skip
    return plans[sliding_window]


def _base_function(module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # eager is each model file's own function
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise ValueError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
        return function
    return ALL_ATTENTION_FUNCTIONS[base]


def _packed_attention(base: str):
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if is_layout(attention_mask):
            unsupported = [name for name in ("softcap", "s_aux", "position_bias") if kwargs.get(name) is not None]
            if unsupported:
                raise NotImplementedError(f"the segments kernel does not support {', '.join(unsupported)}")
            positions = kwargs.get("position_ids")
            window = kwargs.get("sliding_window")
            if window is not None and positions is None:
                raise NotImplementedError("a sliding window needs position_ids in the attention kwargs")
            output = segments_attention(query, key, value, attention_mask, scaling, dropout, window, positions)
            return output, None
        if _is_block_mask(attention_mask):
            from transformers.integrations.flex_attention import flex_attention_forward

            window = kwargs.get("sliding_window")
            if window is not None and query.shape[2] > window:
                raise NotImplementedError(f"the flex block mask has no sliding window ({window} < {query.shape[2]})")
            return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return _base_function(module, base)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    return forward


def _is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask"


def base_implementation(model) -> str | None:
    """The attention implementation the model had before :func:`install` (None: not an AttentionInterface model)."""
    config = _config(model)
    name = getattr(config, "_attn_implementation", None)
    if name is None:
        return None
    return name.removeprefix(PREFIX)


def _config(model):
    inner = model
    while not hasattr(inner, "config") and hasattr(inner, "module"):
        inner = inner.module
    return getattr(inner, "config", None)


def _pretrained_models(model) -> list:
    """Every Hugging Face model inside ``model`` (a policy-with-value module holds two)."""
    from transformers import PreTrainedModel

    return [module for module in model.modules() if isinstance(module, PreTrainedModel)]


def install(model) -> str | None:
    """Route the attention of every Hugging Face model inside ``model`` through ``dpolab+<base>``.

    Returns None when installed, else why it cannot be: models that do not dispatch attention through
    Hugging Face's ``AttentionInterface`` cannot take the layout tensor and keep the dense mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    models = _pretrained_models(model)
    if not models:
        return f"{type(model).__name__} is not a Hugging Face model"
    for pretrained in models:
        if not getattr(pretrained, "_supports_attention_backend", False):
            return f"{type(pretrained).__name__} does not dispatch attention through transformers' AttentionInterface"
        if base_implementation(pretrained) is None:
            return f"{type(pretrained).__name__} has no attention implementation set"
    for pretrained in models:
        base = base_implementation(pretrained)
        name = PREFIX + base
        AttentionInterface.register(name, _packed_attention(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
        pretrained.config._attn_implementation = name
    return None


def uninstall(model) -> None:
    """Back to each model's own attention implementation."""
    for pretrained in _pretrained_models(model):
        if (base := base_implementation(pretrained)) is not None:
            pretrained.config._attn_implementation = base


def installed(model) -> bool:
    models = _pretrained_models(model)
    return bool(models) and all(
        str(getattr(m.config, "_attn_implementation", "") or "").startswith(PREFIX) for m in models
    )


def mask_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype of an additive mask: autocast's if on, else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def packed_inputs(model, batch: PackedBatch, kernel: Kernel) -> dict:
    """The forward arguments of packed rows for this kernel (installing the dispatcher when it needs it)."""
    if kernel != "dense" and not installed(model):
        refusal = install(model)
        if refusal:
            raise ValueError(f"the {kernel} attention kernel cannot be used: {refusal}")
    if kernel == "segments":
        mask = layout_mask(batch)
    elif kernel == "flex":
        mask = block_mask(batch)
    else:
        mask = batch.attention_mask(mask_dtype(model, batch.input_ids.device))
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}
