"""The methods under study: TR scheduling, statistical pre-calibration, decoupleQ.

Importing this package registers them; each lands with its own issue. Methods know nothing
about evaluation, records or the runner: they see a model, the data they may use and a context.
"""

from methods import decoupleq, precalibration, tr_scheduling  # noqa: F401
