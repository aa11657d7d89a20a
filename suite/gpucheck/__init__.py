"""The GPU check (issue 25): one prepared command that runs every CUDA path end to end.

A GPU machine comes rarely and briefly (one call of at most ~9 minutes, no network, the working
tree plus 64 MiB of carried files), so everything is prepared and proven on the CPU first:

* ``carry``: the carry folder ``.gpu-carry/`` (git-ignored): the wheels the GPU image lacks
  (measured: the distributions the GPU half imports, less what the image ships), the tiny
  model's tokenizer and config, the local corpora and their token streams, the vision data and
  FP checkpoint, and the CPU half's records; the size check; the device command.
* ``tinyllm``: the small LLaMA-architecture model, written on the fly from a seeded generator
  (byte-identical on every machine, so its run keys match across devices), its corpora and the
  two grids (LM: FP, RTN, GPTQ, decoupleQ, pre-calibration and the chain at W4 / W3 g128;
  vision: LSQ and TR scheduling, 50 steps).
* ``parts``: the halves. CPU half: both grids on the CPU (their records are carried). GPU half:
  ``pytest -m gpu``, the kernel table, GPTQ / decoupleQ per-layer cost, both grids on cuda and
  their verdicts against the CPU records, each part in its own time box, each writing its CSV
  into the output folder as it finishes.

Run it with ``nox -s gpu-check`` (``python -m suite.gpucheck --help``). Nothing here touches
CUDA on import; the GPU half's parts skip cleanly (a CSV row saying so) without a device.
"""

CARRY = ".gpu-carry"  # relative to the repository root, on both machines
