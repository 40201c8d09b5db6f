"""Continual-learning demo and evaluation harness for MaskedAdamW (permuted digits).

Run ``python -m masked_optim.demo`` (or ``masked-optim-demo``); see ``results/cl/README.md``.
The core package never imports this subpackage; it needs the ``demo`` extra
(scikit-learn, matplotlib, tqdm).
"""
