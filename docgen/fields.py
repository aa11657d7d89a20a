"""Documentation text of config keys whose code has none yet.

The reference page takes each key's text from the code first: an attribute docstring, the
class docstring's ``Attributes:`` entry, a ``#`` comment on or above the field, or a sentence of
the class docstring naming it in double backticks. The keys below have no such text in the code
today; they are written here, in the docs tooling, because the modules that declare them are
owned elsewhere. Moving an entry into its class (as an attribute docstring or an
``Attributes:`` entry) makes it unused here, and ``tests/test_docs.py`` then asks for its removal,
so the text lives in one place only.

Keys of ``TEXT`` are ``Class.field`` for dataclass fields and the dotted YAML path for the
sections and the keys that are not dataclass fields (``axes.wbits``). ``CLI_TEXT`` does the
same for ``qbench`` arguments without argparse help, keyed ``<subcommand> <dest>``.
"""

from __future__ import annotations

TEXT: dict[str, str] = {
    # top-level sections of a grid YAML (suite.config._TOP)
    "name": "The grid's name: the stem of its result files (`results/<name>.csv`) and what "
            "`--grid` selects in a file holding several grids.",
    "description": "Free text printed above the grid's tables and in results/README.md.",
    "axes": "The table's axes: the grid is their product (models x methods x formats x seeds), "
            "less the `exclude` rules.",
    "fixed": "Settings shared by every cell, printed as caveats under the tables.",
    "methods": "Per-method parameters, `{<method id>: {key: value}}`, validated by each "
               "method's config dataclass (below). A variant `<id>:<label>` is its own row "
               "with its own parameters.",
    "run": "How cells execute (store, device, executor, retries); none of it enters the run "
           "key.",
    "exclude": "Rules dropping cells: a cell is dropped when it matches every field a rule "
               "names.",
    # axes (suite.config._AXES)
    "axes.model": "Model ids: a registered LLM (`qbench list models`), `hf:<repo or "
                  "dir>[@revision]`, or a vision `<arch>@<dataset>`; LLM and vision models "
                  "never share a grid.",
    "axes.method": "Method ids, variants (`lsq:adam`) or chains (`precalibration+gptq`).",
    "axes.wbits": "Weight bit widths.",
    "axes.group_size": "Columns per scale group: a positive divisor of every target layer's "
                       "input width, `per-channel` (one group per output row) or `per-tensor`.",
    "axes.seed": "Cell seeds (calibration sampling, initialisation, data order).",
    "axes.sym": "Symmetric weight grids (`true`) or asymmetric with a zero point (`false`).",
    "axes.calib": "Calibration corpus ids (LLM grids): a method that calibrates runs once per "
                  "corpus, a data-free one once; default: `fixed.calib.corpus` alone. A corpus "
                  "that shares text with an evaluation corpus is refused.",
    # fixed (suite.config._FIXED)
    "fixed.scale_dtype": "Storage type of the scales (and float zeros); counted in the "
                         "effective bits.",
    "fixed.calib": "Calibration data of the methods that need it (LLM grids).",
    "fixed.eval": "The evaluation protocols, a list of mappings selected by `type`: `ppl`, "
                  "`acc` or `top1`.",
    "fixed.vision": "The vision track's shared FP checkpoint, QAT budget and calibration size "
                    "(vision grids only).",
    # exclude rule keys (suite.config._EXCLUDE)
    "exclude.model": "Match cells of this model id.",
    "exclude.method": "Match cells of this method (chain) id.",
    "exclude.wbits": "Match cells of this weight bit width.",
    "exclude.group_size": "Match cells of this group size (`per-channel` and `per-tensor` "
                          "accepted).",
    "exclude.seed": "Match cells of this seed.",
    "exclude.sym": "Match symmetric (`true`) or asymmetric (`false`) cells.",
    "exclude.calib": "Match cells calibrated on this corpus id (data-free cells have none).",
    # suite.config dataclasses
    "CalibSpec.corpus": "Calibration corpus id (`qbench list datasets`); checked for shared "
                        "32-token spans with the evaluation text before any cell runs.",
    "CalibSpec.windows": "Number of calibration windows drawn (seeded by the cell's seed).",
    "CalibSpec.seqlen": "Tokens per calibration window.",
    "EvalSpec.type": "`ppl`: GPTQ-protocol perplexity.",
    "EvalSpec.corpus": "Evaluation corpus id (`qbench list datasets`).",
    "EvalSpec.seqlen": "Tokens per non-overlapping window.",
    "EvalSpec.windows": "Windows spread evenly over the stream (null: every window).",
    "TaskSpec.type": "`acc`: multiple-choice accuracy through lm-eval (`acc` and `acc_norm`).",
    "TaskSpec.task": "`bigbench:<task>[/<subtask>]` (offline) or `lm-eval:<task>` (hub).",
    "TaskSpec.shots": "Few-shot examples per question.",
    "Top1Spec.type": "`top1`: image classification accuracy.",
    "Top1Spec.dataset": "The dataset of the grid's `<arch>@<dataset>` models.",
    "Top1Spec.split": "The split scored (always the whole test split).",
    "SlurmSpec.partition": "Slurm partition (null: the cluster's default).",
    "SlurmSpec.array_parallelism": "Array tasks running at once.",
    "SlurmSpec.mem_gb": "Memory per task, GB.",
    "RunSpec.store": "Directory of the cell records (one JSON file per run key).",
    "RunSpec.timeout_s": "Seconds per attempt; past it the cell is killed and recorded as "
                         "`timeout`.",
    "RunSpec.device": "`cpu`, `cuda`, or `auto` (cuda when available).",
    "RunSpec.determinism": "`strict`: deterministic kernels and fixed threads (metrics "
                           "repeat exactly on one machine); `fast`: allow nondeterministic "
                           "kernels.",
    "RunSpec.threads": "Torch threads per cell (null: the cores split between the slots).",
    "RunSpec.executor": "Where pending cells run: `local`, `slurm` (submitit) or `ray`.",
    "RunSpec.slurm": "The Slurm executor's settings (below).",
    "RunSpec.ray": "The Ray executor's settings (below).",
    "TrainSpec.epochs": "Passes over the train split.",
    "TrainSpec.batch_size": "Training batch size.",
    "TrainSpec.optimizer": "`adam` or `sgd`.",
    "TrainSpec.lr": "Base learning rate.",
    "TrainSpec.momentum": "SGD momentum.",
    "TrainSpec.nesterov": "Nesterov momentum (SGD).",
    "TrainSpec.weight_decay": "Weight decay.",
    "TrainSpec.label_smoothing": "Label smoothing of the cross-entropy loss.",
    "TrainSpec.augment": "Random crop (pad 4) and horizontal flip.",
    "TrainSpec.eval_batch_size": "Batch size of the evaluation passes.",
    # method configs without per-field text
    "GPTQConfig.blocksize": "Columns per lazy-update block B.",
    "GPTQConfig.percdamp": "Damping lambda = percdamp x mean(diag H) added to H.",
    "GPTQConfig.act_order": "Process columns by descending diag(H) (act-order).",
    "GPTQConfig.static_groups": "Fit every group's scale and zero up front on the unpermuted "
                                "weights (with act-order: groups stay contiguous in storage).",
    "GPTQConfig.true_sequential": "Collect each sub-layer's Hessian after the previous "
                                  "sub-layers of the block were quantized.",
    "GPTQConfig.max_damp_escalations": "Extra x10 damping tries when the Cholesky factorization "
                                       "fails (each escalation is recorded).",
}

CLI_TEXT: dict[str, str] = {
    "list what": "what to list (default: all)",
}
