"""Baselines every new method is compared against: RTN, GPTQ, AWQ (PTQ) and LSQ (QAT), and the FP
reference.

Every module of this package is imported on the registry's first lookup
(``suite.interface.builtin_modules``), as in ``methods/``. Baselines know nothing about
evaluation or the runner.
"""
