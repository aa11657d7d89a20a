"""Baselines every new method is compared against: RTN, GPTQ (PTQ) and LSQ (QAT).

Importing this package registers them. Baselines know nothing about evaluation or the runner.
"""

from baselines import fp, gptq, lsq, rtn  # noqa: F401
