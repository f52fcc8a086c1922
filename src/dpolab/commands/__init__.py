"""The ``dpolab`` subcommands: each module registers one command or command group.

Every module exposes ``register(subparsers)``, which adds its parser(s) with their arguments and
``set_defaults(handler=...)``, and holds the handler(s). Handlers import heavy libraries (torch,
transformers, rich) inside their bodies, so ``dpolab --help`` stays fast.
"""
