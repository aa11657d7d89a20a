"""Baselines every new method is compared against: RTN (and, as issues land, GPTQ, LSQ).

Importing this package registers them. Baselines know nothing about evaluation or the runner.
"""

from baselines import fp, gptq, rtn  # noqa: F401
