"""Training: recipes, the one training loop, FSDP2 parallelism, checkpoints, LR schedule.

- ``recipe``: ``TrainConfig`` (YAML + ``key.sub=value`` overrides; imports no torch)
- ``loop``: ``train(cfg, run_dir)`` and ``videollama train``
- ``parallel``: activation checkpointing, compile, FSDP2 / HSDP
- ``checkpoint``: sharded DCP checkpoints, atomic ``latest``, resume, ``videollama export``
- ``schedule``: ``lr_at`` (warmup + cosine) and its LambdaLR
- ``plot``: ``videollama plot``
"""
