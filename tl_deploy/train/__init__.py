"""Training: fine-tune a pretrained backbone on an ImageFolder and write a model artifact.

Read it in this order: ``config`` (every option, with its help and range) and ``cli`` (the parser
generated from it); ``recipe.fit`` (setup -> linear probe -> fine-tuning -> final evaluation ->
artifact), which calls ``probe``, ``finetuning``, ``loop`` (the epoch loop and evaluation), ``optim``,
``loaders``, ``amp``, ``stage_cache`` (frozen-stage outputs computed once), ``feature_cache`` (probe
features on disk), ``checkpoint`` (``--resume``), ``distributed`` (torchrun) and ``adaptation``
(domain adaptation). ``transfer_curve`` is the few-shot experiment built from the same pieces.
"""
