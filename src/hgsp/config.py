"""Arguments of a pruning run: one dataclass whose fields carry their own help text.

The command line is generated from these fields (:mod:`hgsp.cli`), so the flag names, defaults
and help of ``run_global_pruning.py`` and ``hgsp prune`` cannot drift from the library.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from .data import CALIBRATION_DATASETS
from .errors import UserError
from .methods import METHODS
from .salience import METHODS as IMPORTANCE_METHODS
from .scoring import BLOCK_DELTAS

EVAL_KINDS = ("ppl", "zeroshot", "efficiency")

# --importance_norm auto: per-layer normalization up to this pruning ratio, per-block above.
# On the quality benchmark (benchmarks/README.md, "Normalized per layer") layer gave the lower
# perplexity at 10-30% and block at 50%, with 40% a trade; the step sits in between.
AUTO_NORM_LAYER_UP_TO = 0.3


# Scoring options added after the first release, with the value that reproduces a run made
# before each existed: replaying an older logs/config.json (``prune --config``) that lacks
# one must redo that run, not silently switch to the newer default.
BEFORE_OPTION = {"bias_compensation": False, "block_floor": False, "collapse_scope": "all",
                 "importance_norm": "none", "block_delta": "alone", "refit_outputs": False}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    """Everything that determines a pruning run (saved as ``logs/config.json``)."""

    base_model: str = _f(None, "base model: a Hugging Face model folder, a hub id, or a .gguf "
                               "file (de-quantized on load)", required=True)
    output_name: str = _f(None, "results go to RESULTS_DIR/OUTPUT_NAME/", required=True)
    pruning_ratio: float = _f(0.5, "fraction of ALL parameters to remove (embeddings included, "
                                   "tied weights counted once); 0.5 = remove half. A list "
                                   "such as 0.2,0.3,0.5 writes OUTPUT_NAME_r0.2, ... from one "
                                   "scoring pass", cli_type=str)
    method: str = _f("hgsp", "pruning method: hgsp (global width and depth), or a baseline "
                             "for comparison: llm_pruner, wanda_sp, flap, shortgpt (see README)",
                     choices=METHODS)
    temperature: float = _f(1.0, "H-GSP temperature T: score = I/cost * ln(1+Δ)^T; 0 = pure "
                                 "importance (skips the removal analysis), >1 protects sensitive "
                                 "layers more")
    tau: float | None = _f(None, "gate threshold τ on the layer-removal Δ (default: its 25th "
                                 "percentile); layers with Δ_layer < τ are scored as whole layers")
    tau_quantile: float = _f(0.25, "the automatic τ: this quantile of the layer-removal Δ "
                                   "(used when --tau is not given)")
    importance_norm: str = _f("auto", "divide each group's importance per parameter by that "
                                      "of its block (or layer) before the Δ factor, so Δ alone "
                                      "ranks layers and blocks (T > 0 only; none = raw); auto "
                                      "= layer up to a pruning ratio of "
                                      f"{AUTO_NORM_LAYER_UP_TO:g}, block above",
                              choices=("auto", "block", "layer", "none"))
    block_floor: bool = _f(True, "in Block-Dominant layers, count each block's Δ as at least "
                                  "τ, so no block of a sensitive layer looks cheaper than a "
                                  "removable (Layer-Dominant) layer", negatable=True)
    block_delta: str = _f("shapley", "Δ of a block of a Block-Dominant layer: shapley (at "
                                     "least its Shapley share of the layer's Δ, so the joint "
                                     "cost of removing both blocks counts), or alone (its "
                                     "removal alone, as DESIGN.md §5 has it)",
                          choices=BLOCK_DELTAS)
    delta_metric: str = _f("ppl", "Δ of a removal: ppl (perplexity increase P-P0) or loss "
                                  "(loss increase ln P - ln P0)", choices=("ppl", "loss"))
    epsilon: float = _f(0.15, "collapse threshold ε: a layer keeping less than this fraction of "
                              "its parameters is removed whole while the ratio allows "
                              "(0 disables)")
    bias_compensation: bool = _f(True, "give each pruned o_proj/down_proj a bias holding the "
                                        "calibration-mean contribution of its removed heads and "
                                        "channels (as FLAP does); for --method hgsp (flap always "
                                        "compensates, the other baselines never do)",
                                 negatable=True)
    refit_outputs: bool = _f(True, "with bias compensation, also refit the kept columns of each "
                                   "narrowed o_proj/down_proj (ridge regression toward their "
                                   "original values) so that it reproduces the full block's "
                                   "output on the calibration tokens; for --method hgsp",
                             negatable=True)
    refit_damp: float = _f(1.0, "ridge strength of --refit_outputs, relative to the mean "
                                "squared input; larger stays closer to bias compensation alone")
    collapse_scope: str = _f("layer_dominant", "layers that collapse (ε) may remove: all, or only "
                                    "layer_dominant ones (a sensitive layer thinned below ε "
                                    "keeps what is left)", choices=("all", "layer_dominant"))
    round_to: int = _f(1, "keep every layer's MLP width a multiple of N (e.g. 8 or 64) so the "
                          "pruned matrices suit fast kernels; 1 = no rounding")
    dataset: str = _f("wikitext2", "calibration corpus (its train split); alpaca = instruction "
                      "data, for instruction-tuned models; a mix such as c4+alpaca draws "
                      "equally from both", choices=CALIBRATION_DATASETS)
    importance_method: str = _f("taylor", "group importance", choices=IMPORTANCE_METHODS)
    kv_group_scoring: str = _f("shared", "--method llm_pruner: which query heads' scores a KV "
                                         "group's score includes: shared = those that share "
                                         "its KV head (the heads the group removes); "
                                         "positional = those at its position modulo the KV-head "
                                         "count, as LLM-Pruner's llama3.py folds them",
                               choices=("shared", "positional"))
    num_examples: int = _f(32, "calibration windows for the importance")
    seq_len: int = _f(128, "tokens per calibration / analysis window")
    gradient_batch_size: int = _f(4, "windows per gradient batch: the loss is the mean over "
                                     "a batch (its windows run one at a time, except with "
                                     "taylor_2nd); also the batch of the forward-only passes "
                                     "(activation statistics, refit)")
    gradient_passes: int = _f(2, "split the layers into N groups, one calibration pass each: "
                                 "the gradient sums held at once shrink N-fold, same "
                                 "importances, more forward passes")
    use_gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass "
                                                 "(less memory, slower)")
    gradient_sums_on_cpu: bool = _f(False, "keep the float32 gradient sums of the importance in "
                                           "CPU memory (GPU memory: the model and one pass's "
                                           "gradients; about 4 bytes per parameter less)")
    analysis_samples: int = _f(16, "windows for the layer/block removal analysis (disjoint from "
                                   "the calibration windows)")
    analysis_batch_size: int = _f(8, "windows per forward pass in the removal analysis")
    seed: int = _f(42, "random seed (window choice; fine-tuning examples and order)")
    data_dir: str | None = _f(None, "extra local data directory searched first (see README: "
                                    "offline data)")
    results_dir: str = _f("results", "parent directory of the results")
    overwrite: bool = _f(False, "replace an existing RESULTS_DIR/OUTPUT_NAME (only once the new "
                                "run has finished)")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda if available)")
    dtype: str = _f("auto", "model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, "
                            "bfloat16, float16", choices=("auto", "float32", "bfloat16", "float16"))
    device_map: str | None = _f(None, "accelerate device map for models larger than one device "
                                      "(e.g. auto)")
    cache: bool = _f(True, "reuse importances and removal analysis cached under "
                           "$HGSP_HOME/cache for the same model, data and settings",
                     negatable=True)
    save_bin: bool = _f(True, "also write models/pruned_model.bin (loadable with "
                              "torch.load(weights_only=True))", negatable=True)
    run_evaluation: str | None = _f(None, "evaluations after pruning, comma-separated: ppl, "
                                          "zeroshot, efficiency, or all")
    eval_ppl_datasets: str = _f("wikitext2,ptb", "perplexity datasets (wikitext2, ptb, ptb_val, "
                                                 "c4; ptb_val is PTB's validation split)")
    eval_ppl_seq_len: str = _f("128", "perplexity window lengths, comma-separated (e.g. 128,2048)")
    eval_ppl_max_windows: int | None = _f(None, "evaluate only the first N perplexity windows "
                                                "(quick looks; recorded in the results)")
    eval_zeroshot_tasks: str = _f("default", "zero-shot tasks and/or suites, comma-separated: "
                                             "default (piqa,hellaswag,winogrande,arc_easy), "
                                             "llm_pruner (7 tasks), slicegpt (5 tasks)")
    eval_zeroshot_limit: int | None = _f(None, "evaluate only the first N documents per task")
    finetune: bool = _f(False, "fine-tune the pruned model to recover quality")
    finetune_method: str = _f("lora", "lora or full", choices=("lora", "full"))
    finetune_samples: int = _f(500, "fine-tuning examples")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA scale alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the input of the LoRA update (0.05, as in "
                                  "LLM-Pruner, makes a CPU step about a sixth slower)")
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                  "projections that get a LoRA update, comma-separated (those "
                                  "that pruning removed everywhere are skipped)")
    finetune_data_path: str | None = _f(None, "Alpaca-format data (instruction, input, output) "
                                              "for --finetune: a .json/.jsonl file or a Hub "
                                              "dataset id (default: alpaca/alpaca_en_demo.json "
                                              "in the local data directories, else "
                                              "yahma/alpaca-cleaned)")
    finetune_val_samples: int = _f(50, "held-out examples for the validation loss (disjoint "
                                       "from the training ones; 0 = none)")
    finetune_lr: float | None = _f(None, "peak learning rate (default: 1e-3 for lora, 1e-4 for "
                                         "full: a short recovery run; lower them for long runs "
                                         "on large models)")
    finetune_epochs: float = _f(2.0, "passes over the fine-tuning examples")
    finetune_micro_batch: int = _f(4, "examples per forward/backward pass")
    finetune_grad_accum: int = _f(4, "micro-batches per optimizer step (batch = micro_batch x "
                                     "grad_accum x processes)")
    finetune_cutoff_len: int = _f(256, "tokens per example (prompt + response); longer ones "
                                       "are cut")
    finetune_gradient_checkpointing: bool = _f(True, "recompute activations in the fine-tuning "
                                                     "backward pass (less memory, slower)",
                                               negatable=True)
    log_level: str = _f("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def resolved_importance_norm(self) -> str:
        """The normalization this run uses: ``auto`` resolved by the pruning ratio."""
        if self.importance_norm != "auto":
            return self.importance_norm
        return "layer" if self.pruning_ratio <= AUTO_NORM_LAYER_UP_TO + 1e-9 else "block"

    @property
    def evaluations(self) -> list[str]:
        if not self.run_evaluation:
            return []
        kinds = [k.strip() for k in self.run_evaluation.split(",") if k.strip()]
        return list(EVAL_KINDS) if "all" in kinds else kinds

    def validate(self) -> None:
        """Check every argument that can be checked without loading anything.

        Raises:
            UserError: naming the first bad argument and what is allowed.
        """
        for f in fields(self):
            if f.metadata.get("required") and not getattr(self, f.name):
                raise UserError(f"--{f.name} is required")
        if not re.fullmatch(r"[\w.\-]+", self.output_name) or self.output_name.startswith("."):
            raise UserError(f"--output_name '{self.output_name}' must be a plain folder name "
                            "(letters, digits, _ . -)")
        if not 0 < self.pruning_ratio < 1:
            raise UserError(f"--pruning_ratio {self.pruning_ratio:g} must be between 0 and 1 "
                            "(exclusive), e.g. 0.5")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise UserError(f"--temperature {self.temperature} must be a finite number >= 0")
        if self.tau is not None and not self.tau >= 0:
            raise UserError(f"--tau {self.tau} must be >= 0 (inf: every layer Layer-Dominant)")
        if not 0 <= self.tau_quantile <= 1:
            raise UserError(f"--tau_quantile {self.tau_quantile} must be in [0, 1]")
        if not 0 <= self.epsilon < 1:
            raise UserError(f"--epsilon {self.epsilon} must be in [0, 1)")
        if not 0 < self.refit_damp < math.inf:
            raise UserError(f"--refit_damp {self.refit_damp} must be a finite number > 0 "
                            "(--no-refit_outputs turns the refit off)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"unknown --{f.name} '{getattr(self, f.name)}': use one of "
                                f"{', '.join(choices)}")
        for name in ("round_to", "num_examples", "seq_len", "gradient_batch_size",
                     "gradient_passes", "analysis_samples",
                     "analysis_batch_size", "finetune_samples", "lora_r"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer")
        if self.seq_len < 2:
            raise UserError("--seq_len must be at least 2 tokens")
        if self.kv_group_scoring != "shared" and self.method != "llm_pruner":
            raise UserError(f"--kv_group_scoring {self.kv_group_scoring} is LLM-Pruner's "
                            "scoring: use it with --method llm_pruner, or drop it")
        unknown = set(self.evaluations) - set(EVAL_KINDS)
        if unknown:
            raise UserError(f"unknown --run_evaluation '{','.join(sorted(unknown))}': use "
                            f"{', '.join(EVAL_KINDS)} or all")
        for name in ("eval_ppl_max_windows", "eval_zeroshot_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer")
