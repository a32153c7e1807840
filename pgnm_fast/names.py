"""The names the command line offers, kept free of heavy imports so that ``pgnm-fast --help``
answers without loading torch: classifier models, mask-step implementations, LR schedulers, optimisers.

:mod:`pgnm_fast.models`, :mod:`pgnm_fast.kernels` and :mod:`pgnm_fast.optim` use these
(a test checks that the model names match the model table)."""

MODELS = ("resnet10t", "resnet18", "resnet50")
IMPLS = ("reference", "fast")
SCHEDULERS = ("steplr", "cosineannealinglr", "constant")
OPTIMIZERS = ("sgd", "adamw")
LOADERS = ("auto", "device", "dali", "torch")
DEVICES = ("auto", "cpu", "cuda")
