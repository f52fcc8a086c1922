"""dpolab: preference optimisation for language models — the DPO family, its failure modes, and their fixes."""

__version__ = "0.1.0"
