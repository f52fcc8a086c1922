"""Training: one recipe per method over shared blocks, each module named for what it holds — the accelerator
(:mod:`~dpolab.train.accelerator`), the run folder (:mod:`~dpolab.train.run_folder`), the models
(:mod:`~dpolab.train.models`), the data and its order (:mod:`~dpolab.train.data_order`), the optimiser step
(:mod:`~dpolab.train.step`), held-out evaluation (:mod:`~dpolab.train.evaluation`), what a run keeps across a stop
(:mod:`~dpolab.train.state`, :mod:`~dpolab.train.lifecycle`) and the course of every loop (:mod:`~dpolab.train.loop`).

``dpolab.train.run(config)`` is the Python form of ``dpolab train CONFIG.yaml``: it runs the recipe that
``config.task`` names in :data:`dpolab.train.registry.RECIPES` — ``preference`` (:mod:`dpolab.train.preference`),
``sft`` (:mod:`dpolab.train.sft`), ``reward`` (:mod:`dpolab.train.reward`) or ``ppo`` (:mod:`dpolab.train.ppo`).
"""

from pathlib import Path

from dpolab.train.config import TrainConfig, load_config


def run(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train with the recipe of ``config.task``; see :func:`dpolab.train.preference.train`.

    Torch threads are set for a machine shared by the run's processes (:func:`dpolab.console.configure_threads`);
    transformers' own progress bars and peft's deprecation warning stay quiet while it runs. When another
    process of a multi-process run dies, raises :class:`dpolab.train.distributed.PeerLost` naming it.
    """
    from dpolab.console import configure_threads, quiet_libraries
    from dpolab.train.checkpoint import latest_checkpoint
    from dpolab.train.distributed import stop_when_a_peer_dies
    from dpolab.train.registry import recipe

    train = recipe(config.task).train()
    configure_threads(config.threads)
    # Here, around every recipe: a process that dies under torchrun ends the others with PeerLost, not with
    # the error of whichever collective noticed it.
    output_dir = Path(config.output_dir).expanduser().absolute()
    with quiet_libraries(), stop_when_a_peer_dies(lambda: latest_checkpoint(output_dir)):
        return train(config, resume=resume, overwrite=overwrite)


__all__ = ["TrainConfig", "load_config", "run"]
