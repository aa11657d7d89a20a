"""The methods under study: TR scheduling, statistical pre-calibration, decoupleQ.

Every module of this package is imported on the registry's first lookup
(``suite.interface.builtin_modules``), so a new file here with ``@METHODS.register("mine")``
is a method with no other edit; modules named ``_*`` are helpers and are not scanned. Methods
know nothing about evaluation, records or the runner: they see a model, the data they may use
and a context.
"""
