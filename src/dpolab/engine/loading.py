"""The one model and tokenizer loader: train, sft, sample, judge, eval and the quickstart all load through it.

Policy, the same everywhere: weights are read from safetensors only unless ``allow_pickle`` (pickle
files can run code); a local folder without safetensors weights is refused with its name; a path that
looks local but does not exist is named as missing instead of being tried on the hub; model code from
the hub runs only with ``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from dpolab.data.formats import looks_local as looks_like_local_path

ModelKind = Literal["causal_lm", "sequence_classification"]


def looks_local(name: str | Path) -> bool:
    """A path rather than a hub id: a Path, or as :func:`dpolab.data.formats.looks_local` (starts with . / ~,
    has more than one slash, exists, has a file suffix, or its first folder exists here)."""
    return isinstance(name, Path) or looks_like_local_path(name)


def _check_source(name: str | Path, allow_pickle: bool, what: str) -> None:
    if not looks_local(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"{what}: no such folder: {name}")
    if not allow_pickle and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ValueError(f"{what}: {name} has only pickle (.bin) weights; convert them to safetensors or allow_pickle")


def load_model(
    name: str | Path,
    kind: ModelKind = "causal_lm",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
    what: str = "model",
    num_labels: int | None = None,
):
    """A Hugging Face model (causal LM or sequence classifier) from a folder or hub id, under the policy above.

    ``num_labels``: the output count of a sequence classifier (1 for a reward or value model).
    ``what`` names the config key in errors (``model``, ``reference``). A local folder whose files cannot be
    read (a truncated ``model.safetensors``, a broken ``config.json``) is a ``ValueError`` naming the folder.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_source(name, allow_pickle, what)
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(
            str(Path(name).expanduser()) if looks_local(name) else name,
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **({"num_labels": num_labels} if num_labels is not None else {}),
        )
    except (SafetensorError, OSError, ValueError) as error:
        if not looks_local(name):
            raise
        detail = " ".join(str(error).split())
        raise ValueError(f"{what}: cannot load the model in {name}: {detail[:300]}") from None
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a folder or hub id."""
    from transformers import AutoTokenizer

    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise ValueError(f"tokenizer: no such folder: {name}")
    return AutoTokenizer.from_pretrained(
        str(Path(name).expanduser()) if looks_local(name) else name, trust_remote_code=trust_remote_code
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
