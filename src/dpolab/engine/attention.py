"""Attention over prefix-shared packed rows without a dense mask: what each kernel computes and how it is installed.

A packed row holds several items, each ``[prompt | branch 1 | branch 2 …]`` (:mod:`dpolab.data.packing`).
Token i sees token j iff both belong to the same item, j ≤ i, and j is a prompt token or of i's own branch.
With a dense ``(rows, 1, L, L)`` mask every query pays for every key of the row, pairs it cannot see
included, and no fused kernel takes the mask, so the cost of a row grows with L², not with its items.
Four kernels compute the same attention:

- ``segments`` (any device, with gradients): one ``scaled_dot_product_attention`` per item, on that item's
  tokens only, with the item's own small mask (or ``is_causal`` when the item has a single branch, the
  varlen case of SFT and reward rows). The cost is Σ items n², whatever the row length.
- ``flex`` (CUDA): a FlexAttention :class:`BlockMask` of the same rule, so fully masked blocks are
  skipped by the fused kernel (PyTorch's FlexAttention has no backward on CPU; there it serves no-grad
  passes only).
- ``varlen`` (one fused call per layer): each item becomes one plain causal sequence per branch,
  ``[prompt | branch]``, and all of them go to a variable-length kernel (``cu_seqlens``): flash-attn's
  ``flash_attn_varlen_func`` when installed, else PyTorch's ``torch.nn.attention.varlen.varlen_attn`` on
  CUDA. Branches after the first repeat the prompt's keys and values (gathered, not recomputed) and their
  prompt queries' outputs are dropped, so every sequence is square and the causal alignment convention
  of the kernel cannot matter. An SFT or reward row (one branch) is exactly the varlen packing of
  its examples. On CPU a reference loop (one SDPA per sequence) stands in for the fused kernel, for tests.
- ``dense``: the additive 4D mask of :meth:`PackedBatch.attention_mask`, through the model's own kernel.

Hugging Face models choose their attention function by the name in ``config._attn_implementation``;
:func:`install` registers ``dpolab+<base>`` (base: the model's own implementation, e.g. ``sdpa``) and sets
it. The registered function looks at the mask it receives: a *layout tensor* (:func:`layout_mask`) runs
``segments`` (``varlen`` when the layout has its third field), a ``BlockMask`` runs ``flex``, and anything
else goes to the base implementation unchanged, so generation and the naive path behave exactly as before. The layout travels as the attention mask,
not as a global, so gradient checkpointing's recomputation and any wrapper see the same thing.
The base name is what ``save_pretrained`` would write (``_attn_implementation`` is not serialised).
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F

from dpolab.data.packing import PROMPT, PackedBatch

Kernel = Literal["segments", "varlen", "flex", "dense"]
PREFIX = "dpolab+"
LAYOUT_FIELDS = 2  # segment ids, branch ids (a third field of ones marks the varlen kernel)


def layout_mask(batch: PackedBatch, varlen: bool = False) -> torch.Tensor:
    """The layout tensor ``(rows, 1, 2, L)`` (int64: segment ids, branch ids) that the ``segments`` kernel reads;
    ``(rows, 1, 3, L)`` for the ``varlen`` kernel (the kernel travels with the mask, so a checkpointed layer's
    recomputation runs the same one).

    It is 4D, so Hugging Face's mask creation passes it through as an already prepared mask."""
    fields = [batch.segment_ids, batch.branch_ids] + ([torch.ones_like(batch.segment_ids)] if varlen else [])
    return torch.stack(fields, dim=1)[:, None]


def is_layout(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.long and mask.dim() == 4 and mask.shape[2] in (2, 3)


def is_varlen_layout(mask) -> bool:
    return is_layout(mask) and mask.shape[2] == 3


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


class VarlenPlan:
    """The ``varlen`` kernel's sequences over packed rows (flattened ``rows × L`` positions).

    ``gather``: the positions of every sequence's tokens, sequence after sequence (item by item, branch by
    branch: ``[prompt | branch]``); ``keep``: which of them write their output (all of a first branch's
    sequence, only the branch tokens of a later one); ``cu_seqlens`` (int32) and ``max_length`` as
    variable-length kernels take them. Every real token is written exactly once; padding never appears."""

    def __init__(self, layout: torch.Tensor):
        length = layout.shape[-1]
        branches = layout[:, 0, 1].tolist()
        gather: list[int] = []
        keep: list[bool] = []
        lengths: list[int] = []
        for row, spans in enumerate(item_spans(layout)):
            for start, end in spans:
                ids = branches[row][start:end]
                prompt = [row * length + c for c, b in zip(range(start, end), ids, strict=True) if b == PROMPT]
                names = list(dict.fromkeys(b for b in ids if b != PROMPT))
                for number, name in enumerate(names or [PROMPT]):
                    own = [row * length + c for c, b in zip(range(start, end), ids, strict=True) if b == name]
                    tokens = own if name == PROMPT else prompt + own
                    gather += tokens
                    keep += [number == 0 or index >= len(prompt) for index in range(len(tokens))]
                    lengths.append(len(tokens))
        device = layout.device
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.keep = torch.tensor(keep, dtype=torch.bool, device=device)
        self.written = self.gather[self.keep]
        cumulative = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
        self.cu_seqlens = cumulative.to(dtype=torch.int32, device=device)
        self.bounds = cumulative.tolist()
        self.max_length = max(lengths, default=0)


def varlen_plan(layout: torch.Tensor) -> VarlenPlan:
    """:class:`VarlenPlan` of this layout, worked out once per forward (kept on the layout tensor)."""
    plans = layout.__dict__.setdefault("_dpolab_plans", {})
    if "varlen" not in plans:
        plans["varlen"] = VarlenPlan(layout)
    return plans["varlen"]


def reference_varlen(
    query, key, value, plan: VarlenPlan, scaling, window: int | None, dropout: float = 0.0
) -> torch.Tensor:
    """What a variable-length causal kernel computes, one SDPA per sequence: the CPU stand-in (and the
    definition the fused kernels are held to). ``query`` (tokens, heads, dim); ``key``/``value`` may have
    fewer heads."""
    grouped = key.shape[1] != query.shape[1]
    outputs = []
    for start, end in zip(plan.bounds[:-1], plan.bounds[1:], strict=True):
        q, k, v = (tensor[start:end].transpose(0, 1)[None] for tensor in (query, key, value))
        mask = None
        if window is not None and end - start > window:
            offsets = torch.arange(end - start, device=query.device)
            distance = offsets[:, None] - offsets[None, :]
            mask = (distance >= 0) & (distance < window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scaling, enable_gqa=grouped
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs) if outputs else query[:0]


def varlen_function(device: torch.device):
    """(name, function) of the variable-length kernel for this device: flash-attn's when installed (CUDA),
    else PyTorch's ``varlen_attn`` (CUDA), else the reference loop. The function takes (query, key, value,
    plan, scaling, window, dropout) and returns (tokens, heads, dim). PyTorch's kernel has no dropout:
    a call with attention dropout (a model trained with ``disable_dropout: false``) takes the loop."""
    return _varlen_function(device.type)


@cache
def _varlen_function(device_type: str):
    """:func:`varlen_function` by device type, worked out once: every layer of every forward asks."""
    device = torch.device(device_type)
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:

            def flash(query, key, value, plan, scaling, window, dropout=0.0):
                cu, longest = plan.cu_seqlens, plan.max_length
                sides = (-1, -1) if window is None else (window - 1, 0)
                return flash_attn_varlen_func(
                    query, key, value, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling,
                    causal=True, window_size=sides,
                )  # fmt: skip

            return "flash-attn", flash
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None:

            def native(query, key, value, plan, scaling, window, dropout=0.0):
                if dropout:
                    return reference_varlen(query, key, value, plan, scaling, window, dropout)
                cu, longest = plan.cu_seqlens, plan.max_length
                grouped = key.shape[1] != query.shape[1]
                sides = (-1, 0) if window is None else (window - 1, 0)
                return varlen_attn(
                    query, key, value, cu, cu, longest, longest, scale=scaling, window_size=sides, enable_gqa=grouped
                )

            return "torch varlen_attn", native
    return "reference loop", reference_varlen


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The ``varlen`` kernel: (rows, L, heads, dim) as Hugging Face attention functions return, zeros on
    padding. ``query`` is (rows, heads, L, dim); ``key``/``value`` may have fewer heads."""
    rows, heads, length, dim = query.shape
    plan = varlen_plan(layout)

    def flat(tensor):
        return tensor.transpose(1, 2).reshape(rows * length, tensor.shape[1], dim)[plan.gather]

    _, function = varlen_function(query.device)
    out = function(flat(query), flat(key), flat(value), plan, scaling, sliding_window, dropout)
    result = query.new_zeros(rows * length, heads, dim)
    result = result.index_copy(0, plan.written, out[plan.keep].to(result.dtype))
    return result.view(rows, length, heads, dim)


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
                kernel = "varlen" if is_varlen_layout(attention_mask) else "segments"
                raise NotImplementedError(f"the {kernel} kernel does not support {', '.join(unsupported)}")
            positions = kwargs.get("position_ids")
            window = kwargs.get("sliding_window")
            if is_varlen_layout(attention_mask):
                return varlen_attention(query, key, value, attention_mask, scaling, window, dropout), None
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
    if kernel in ("segments", "varlen"):
        mask = layout_mask(batch, varlen=kernel == "varlen")
    elif kernel == "flex":
        mask = block_mask(batch)
    else:
        mask = batch.attention_mask(mask_dtype(model, batch.input_ids.device))
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}
