"""The one model and tokenizer loader: train, sft, sample, judge, eval and the quickstart all load through it.

Policy, the same everywhere:

- weights are read from safetensors only unless ``allow_pickle`` (pickle files can run code); a local folder
  without weights, or whose shard index names a missing shard, is refused with the files it lacks; a path that
  looks local but does not exist is named as missing instead of being tried on the hub; model code from the hub
  runs only with ``trust_remote_code``;
- a model loads whole or not at all: a tensor the checkpoint lacks (transformers would fill it with random
  values), one the model has no place for, or one of another shape is an error naming them. The one expected
  exception is ``new_head``: a causal LM loaded as a one-output classifier gets a new score head and drops its
  LM head, and the caller is told their names;
- a LoRA adapter folder (``adapter_config.json`` and no ``config.json``) loads as its base model
  (``base_model_name_or_path``, through these same rules) with the adapter merged in;
- transformers' own load report and progress bars never reach the terminal, a pipe or a file
  (:func:`dpolab.console.quiet_libraries`): the errors and notes here say what matters.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from dpolab.data.formats import looks_like_path as looks_like_local_path

ModelKind = Literal["causal_lm", "sequence_classification"]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS, ADAPTER_PICKLE = "adapter_model.safetensors", "adapter_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Any one of these makes a folder a tokenizer folder (a fast tokenizer, or the files of a slow one)."""

SHOWN = 5
"""Tensor and file names an error lists; the count says how many there are in all."""


def looks_local(name: str | Path) -> bool:
    """A path rather than a hub id: a Path, or as :func:`dpolab.data.formats.looks_like_path` (starts with . / ~,
    has more than one slash, exists, has a file suffix, or its first folder exists here)."""
    return isinstance(name, Path) or looks_like_local_path(name)


def _local(name: str | Path) -> Path | None:
    return Path(name).expanduser() if looks_local(name) else None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return f"{shown} and {len(names) - SHOWN} more" if len(names) > SHOWN else shown


def _count(names: list, noun: str = "tensor") -> str:
    return f"{len(names)} {noun}{'' if len(names) == 1 else 's'}"


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: cannot read {path}: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {path} is not a JSON object")
    return value


def adapter_base(name: str | Path, what: str = "model") -> str | None:
    """The base model of a local LoRA adapter folder (``base_model_name_or_path`` of its ``adapter_config.json``),
    or None when ``name`` is not one. An adapter folder has ``adapter_config.json`` and no ``config.json`` of its
    own (transformers' own rule); a local base that does not exist is an error naming it and the adapter."""
    path = _local(name)
    if path is None or not (path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file():
        return None
    base = _read_json(path / ADAPTER_CONFIG, what).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{what}: {name} is a LoRA adapter whose {ADAPTER_CONFIG} names no base_model_name_or_path")
    if looks_local(base) and not Path(base).expanduser().is_dir():
        raise ValueError(
            f"{what}: {name} is a LoRA adapter on {base} (base_model_name_or_path in its {ADAPTER_CONFIG}), "
            "and there is no such folder; put the base model there or edit that path"
        )
    return base


def _check_source(name: str | Path, allow_pickle: bool, what: str) -> None:
    """A local folder has its config and every weight file it needs, before transformers reads any of it."""
    path = _local(name)
    if path is None:
        return
    if not path.is_dir():
        raise ValueError(f"{what}: no such folder: {name}")
    if not allow_pickle and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ValueError(f"{what}: {name} has only pickle (.bin) weights; convert them to safetensors or allow_pickle")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what}: {name} lacks config.json (the model's architecture and sizes)")
    choices = [(SAFETENSORS, SAFETENSORS_INDEX)] + ([(PICKLE, PICKLE_INDEX)] if allow_pickle else [])
    for single, index in choices:
        if (path / single).is_file():
            return
        if (path / index).is_file():
            weight_map = _read_json(path / index, what).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{what}: {path / index} has no weight_map naming the shards")
            shards = sorted(set(map(str, weight_map.values())))
            missing = [shard for shard in shards if not (path / shard).is_file()]
            if missing:
                raise ValueError(
                    f"{what}: {name} lacks {_count(missing, 'shard')} of the {len(shards)} that {index} names: "
                    f"{_listing(missing)}"
                )
            return
    wanted = " or ".join(f"{single} (or {index} and its shards)" for single, index in choices)
    raise ValueError(f"{what}: {name} has no weights: it lacks {wanted}")


def _whole(model, info: dict, name: str | Path, what: str, new_head: bool) -> tuple[list[str], list[str]]:
    """Refuse a model that did not load whole; with ``new_head``, (new head tensors, unused checkpoint tensors).

    The new-head exception covers tensors outside the backbone (``base_model_prefix``) only: a classifier's score
    head, and the LM head it replaces. A missing tensor inside the backbone is an error in every case."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()))
    new: list[str] = []
    unused: list[str] = []
    if new_head:
        backbone = f"{model.base_model_prefix}."
        new = [k for k in missing if not k.startswith(backbone)]
        unused = [k for k in unexpected if not k.startswith(backbone)]
        missing = [k for k in missing if k.startswith(backbone)]
        unexpected = [k for k in unexpected if k.startswith(backbone)]
    problems = []
    if missing:
        problems.append(f"{_count(missing)} missing from the checkpoint ({_listing(missing)})")
    if unexpected:
        problems.append(
            f"{_count(unexpected)} in the checkpoint that the model has no place for ({_listing(unexpected)})"
        )
    if mismatched:
        shapes = [
            f"{key} {list(saved)} in the checkpoint, {list(expected)} in the model"
            for key, saved, expected in mismatched
        ]
        problems.append(f"{_count(mismatched)} of another shape ({_listing(shapes)})")
    if problems:
        raise ValueError(
            f"{what}: {name} does not load whole as {type(model).__name__}: {'; '.join(problems)}. "
            "A model loads whole or not at all: use the checkpoint its config.json describes"
        )
    return new, unused


def _load_pretrained(name, kind, dtype, trust_remote_code, allow_pickle, what, num_labels, new_head):
    """(model, new head tensors, unused tensors) of a full checkpoint, checked whole."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from dpolab.console import quiet_libraries

    _check_source(name, allow_pickle, what)
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    path = _local(name)
    try:
        with quiet_libraries():
            model, info = auto.from_pretrained(
                str(path) if path is not None else name,
                dtype=dtype if dtype is not None else "auto",
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
                output_loading_info=True,
                # a shape mismatch is reported with the others below, not as transformers' RuntimeError
                ignore_mismatched_sizes=True,
                **({"num_labels": num_labels} if num_labels is not None else {}),
            )
    except (SafetensorError, OSError, ValueError) as error:
        if path is None:
            raise
        detail = " ".join(str(error).split())
        raise ValueError(f"{what}: cannot load the model in {name}: {detail[:300]}") from None
    new, unused = _whole(model, info, name, what, new_head and kind == "sequence_classification")
    return model, new, unused


def _load(name, kind, dtype, trust_remote_code, allow_pickle, what, num_labels, new_head, chain=()):
    """(model, new head tensors, unused tensors): a full checkpoint, or an adapter on its base (itself maybe an
    adapter: ``chain`` holds the adapter folders on the way, so a loop of adapters is refused, not followed)."""
    base = adapter_base(name, what)
    if base is None:
        return _load_pretrained(name, kind, dtype, trust_remote_code, allow_pickle, what, num_labels, new_head)
    chain = (*chain, str(Path(name).expanduser().resolve()))
    if str(Path(base).expanduser().resolve()) in chain:
        raise ValueError(f"{what}: {name} is a LoRA adapter on {base}, which leads back to an adapter on the way to it")
    return _load_adapter(name, base, kind, dtype, trust_remote_code, allow_pickle, what, num_labels, new_head, chain)


def _load_adapter(
    folder: str | Path, base: str, kind, dtype, trust_remote_code, allow_pickle, what, num_labels, new_head, chain
):
    """(merged model, new head tensors, unused tensors) of a LoRA adapter folder on its base."""
    from peft import PeftModel, get_peft_model_state_dict, load_peft_weights

    from dpolab.console import quiet_libraries

    path = Path(folder).expanduser()
    if not (path / ADAPTER_SAFETENSORS).is_file():
        if (path / ADAPTER_PICKLE).is_file() and not allow_pickle:
            raise ValueError(
                f"{what}: {folder} has only a pickle adapter ({ADAPTER_PICKLE}); convert it to safetensors or allow_pickle"
            )
        if not (path / ADAPTER_PICKLE).is_file():
            raise ValueError(
                f"{what}: {folder} is a LoRA adapter folder without its weights: it lacks {ADAPTER_SAFETENSORS}"
            )
    # A classifier's head may come from the adapter (peft's modules_to_save): the base may lack it for now.
    classifier = kind == "sequence_classification"
    model, new, unused = _load(
        base, kind, dtype, trust_remote_code, allow_pickle, f"{what} (the base of the adapter {folder})", num_labels,
        classifier, chain,
    )  # fmt: skip
    try:
        with quiet_libraries(), warnings.catch_warnings():
            # peft's warning of missing adapter tensors: the check below refuses them, naming each
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            adapted = PeftModel.from_pretrained(model, str(path))
            saved = set(load_peft_weights(str(path)))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{what}: cannot apply the adapter in {folder} to {base}: {detail[:300]}") from None
    # Expected: the adapter's own tensors at least, embedding layers at most (peft saves them when resized).
    needed = set(get_peft_model_state_dict(adapted, save_embedding_layers=False))
    allowed = set(get_peft_model_state_dict(adapted, save_embedding_layers=True))
    missing, unexpected = sorted(needed - saved), sorted(saved - allowed)
    if missing or unexpected:
        problems = [f"{_count(missing)} missing ({_listing(missing)})"] if missing else []
        problems += (
            [f"{_count(unexpected)} that the model has no place for ({_listing(unexpected)})"] if unexpected else []
        )
        raise ValueError(f"{what}: the adapter in {folder} does not load whole on {base}: {'; '.join(problems)}")
    new = [key for key in new if f"base_model.model.{key}" not in saved]
    if classifier and new and not new_head:
        raise ValueError(
            f"{what}: neither {folder} nor its base {base} has the classifier's {_listing(new)}; "
            "a reward model needs its trained score head"
        )
    if not new:
        unused = []  # the adapter's head replaces the LM head by design: nothing of note
    merged = adapted.merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base for inference; a loaded model is trainable, as from_pretrained's
    # Its name is the adapter folder: a new LoRA trained on it records that folder as its base (peft reads the
    # name), not the bare base model, which would load later without this adapter.
    merged.name_or_path = merged.config.name_or_path = str(folder)
    return merged, new, unused


def load_model(
    name: str | Path,
    kind: ModelKind = "causal_lm",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
    what: str = "model",
    num_labels: int | None = None,
    new_head: bool = False,
    note: Callable[[str], None] | None = None,
):
    """A Hugging Face model (causal LM or sequence classifier) from a folder or hub id, under the policy above.

    ``num_labels``: the output count of a sequence classifier (1 for a reward or value model).
    ``what`` names the config key in errors (``model``, ``reference``). A local folder whose files cannot be
    read (a truncated ``model.safetensors``, a broken ``config.json``) is a ``ValueError`` naming the folder;
    so is a model that does not load whole (missing, unexpected or shape-mismatched tensors, named).
    ``new_head`` (sequence classifiers only): a causal LM checkpoint may lack the classifier's head (it is
    initialised at random, from torch's seed) and carry an LM head that goes unused; ``note`` is told their names.
    A LoRA adapter folder loads as its base with the adapter merged (a plain model, no peft wrapper).
    """
    model, new, unused = _load(name, kind, dtype, trust_remote_code, allow_pickle, what, num_labels, new_head)
    if new and note is not None:
        dropped = f"; {', '.join(unused)} of the checkpoint unused" if unused else ""
        note(f"{what}: new {', '.join(new)} (not in {name}: initialised at random){dropped}")
    if device is not None:
        model.to(device)
    return model


def read_model_config(name: str | Path, trust_remote_code: bool = False, what: str = "model"):
    """The transformers config of a model folder or hub id (of an adapter folder: its base's), no weights read."""
    from transformers import AutoConfig

    path = _local(name)
    if path is not None and not path.is_dir():
        raise ValueError(f"{what}: no such folder: {name}")
    base = adapter_base(name, what)
    if base is not None:
        return read_model_config(base, trust_remote_code, f"{what} (the base of the adapter {name})")
    try:
        return AutoConfig.from_pretrained(str(path) if path is not None else name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"{what}: cannot read the config of {name}: {' '.join(str(error).split())[:300]}") from None


def load_tokenizer(name: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a folder or hub id. An adapter folder without tokenizer files of its own: its base's."""
    from transformers import AutoTokenizer

    path = _local(name)
    if path is not None:
        if not path.is_dir():
            raise ValueError(f"tokenizer: no such folder: {name}")
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            base = adapter_base(name, "tokenizer")
            if base is not None:
                return load_tokenizer(base, trust_remote_code)
            raise ValueError(
                f"tokenizer: {name} has no tokenizer files: it lacks tokenizer.json (or tokenizer_config.json "
                "with its vocabulary files); name the tokenizer's folder"
            )
    return AutoTokenizer.from_pretrained(str(path) if path is not None else name, trust_remote_code=trust_remote_code)


def check_vocabulary(model, tokenizer, model_name: str | Path, tokenizer_name: str | Path | None = None) -> None:
    """Refuse a tokenizer whose ids reach past the model's vocabulary: they would index past the embedding
    (an error on CPU, a device assert or garbage on a GPU), so the pair is refused before any step.

    ``model``: a loaded model (its input embedding rows) or its config (``vocab_size``, which sets those rows;
    a checkpoint of another size does not load whole). Fewer tokens than rows is fine (padded vocabularies)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        rows = int(embeddings.weight.shape[0])
    else:
        config = getattr(model, "config", model)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        rows = getattr(text_config, "vocab_size", None)
        if not isinstance(rows, int):
            return  # an architecture without a vocabulary size to compare with
    size = len(tokenizer)
    # The largest id the tokenizer can produce, not its count: a vocabulary with gaps (an id moved past the
    # end) has as many tokens as the model's rows and still indexes past them.
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    largest = max([size - 1, *vocabulary.values(), *(i for i in tokenizer.all_special_ids if isinstance(i, int))])
    if largest >= rows:
        ids = f"{size} tokens" + (f", ids up to {largest}" if largest >= size else "")
        raise ValueError(
            f"tokenizer: {tokenizer_name or model_name} has {ids}, but the model {model_name} has {rows} embedding "
            f"rows, so ids from {rows} up would index past its vocabulary; use the model's own tokenizer, or "
            "resize the model's embeddings to the tokenizer and save it"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
