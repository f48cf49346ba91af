"""Arguments of a pruning run: one dataclass whose fields carry their own help text.

The command line is generated from these fields (:mod:`hgsp.cli`), so the flag names, defaults
and help of ``run_global_pruning.py`` and ``hgsp prune`` cannot drift from the library.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from .data import DATASETS
from .errors import UserError
from .salience import METHODS

EVAL_KINDS = ("ppl", "zeroshot", "efficiency")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    """Everything that determines a pruning run (saved as ``logs/config.json``)."""

    base_model: str = _f(None, "base model: a Hugging Face model folder, a hub id, or a .gguf "
                               "file (de-quantized on load)", required=True)
    output_name: str = _f(None, "results go to RESULTS_DIR/OUTPUT_NAME/", required=True)
    pruning_ratio: float = _f(0.5, "fraction of ALL parameters to remove (embeddings included, "
                                   "tied weights counted once); 0.5 = remove half")
    temperature: float = _f(1.0, "H-GSP temperature T: score = I/cost * ln(1+Δ)^T; 0 = pure "
                                 "importance (skips the removal analysis), >1 protects sensitive "
                                 "layers more")
    tau: float | None = _f(None, "gate threshold τ on the layer-removal Δ (default: its 25th "
                                 "percentile); layers with Δ_layer < τ are scored as whole layers")
    epsilon: float = _f(0.15, "collapse threshold ε: a layer keeping less than this fraction of "
                              "its parameters is removed whole (0 disables)")
    dataset: str = _f("wikitext2", "calibration corpus (its train split)", choices=DATASETS)
    importance_method: str = _f("taylor", "group importance", choices=METHODS)
    num_examples: int = _f(32, "calibration windows for the importance")
    seq_len: int = _f(128, "tokens per calibration / analysis window")
    gradient_batch_size: int = _f(4, "windows per forward/backward pass")
    use_gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass "
                                                 "(less memory, slower)")
    analysis_samples: int = _f(16, "windows for the layer/block removal analysis (disjoint from "
                                   "the calibration windows)")
    analysis_batch_size: int = _f(8, "windows per forward pass in the removal analysis")
    seed: int = _f(42, "random seed (window choice)")
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
    save_bin: bool = _f(True, "also write models/pruned_model.bin (loadable with "
                              "torch.load(weights_only=True))", negatable=True)
    run_evaluation: str | None = _f(None, "evaluations after pruning, comma-separated: ppl, "
                                          "zeroshot, efficiency, or all")
    eval_ppl_datasets: str = _f("wikitext2,ptb", "perplexity datasets (wikitext2, ptb, c4)")
    eval_ppl_seq_len: str = _f("128", "perplexity window lengths, comma-separated (e.g. 128,2048)")
    eval_zeroshot_tasks: str = _f("piqa,hellaswag,winogrande,arc_easy", "zero-shot tasks")
    finetune: bool = _f(False, "fine-tune the pruned model to recover quality")
    finetune_method: str = _f("lora", "lora or full", choices=("lora", "full"))
    finetune_samples: int = _f(500, "fine-tuning examples")
    lora_r: int = _f(8, "LoRA rank")
    log_level: str = _f("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def to_dict(self) -> dict:
        return asdict(self)

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
            raise UserError(f"--pruning_ratio {self.pruning_ratio} must be between 0 and 1 "
                            "(exclusive), e.g. 0.5")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise UserError(f"--temperature {self.temperature} must be a finite number >= 0")
        if self.tau is not None and not self.tau >= 0:
            raise UserError(f"--tau {self.tau} must be >= 0 (inf: every layer Layer-Dominant)")
        if not 0 <= self.epsilon < 1:
            raise UserError(f"--epsilon {self.epsilon} must be in [0, 1)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"unknown --{f.name} '{getattr(self, f.name)}': use one of "
                                f"{', '.join(choices)}")
        for name in ("num_examples", "seq_len", "gradient_batch_size", "analysis_samples",
                     "analysis_batch_size", "finetune_samples", "lora_r"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer")
        if self.seq_len < 2:
            raise UserError("--seq_len must be at least 2 tokens")
        unknown = set(self.evaluations) - set(EVAL_KINDS)
        if unknown:
            raise UserError(f"unknown --run_evaluation '{','.join(sorted(unknown))}': use "
                            f"{', '.join(EVAL_KINDS)} or all")
