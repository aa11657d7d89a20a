"""qbench's harness: config, registry, method interface, primitives, models, data, evaluation,
records, runner, executor, aggregation and rendering.

What it does NOT know: the internals of any method (the runner instantiates methods by registry
id and never branches on a name), and evaluators know nothing about quantization. Importing
``suite`` initialises no CUDA context and imports neither lm-eval nor any method.
"""

__version__ = "0.1.0"
