"""Recovery fine-tuning of a pruned model: LoRA (merged into the weights afterwards) or full.

The pruned model keeps its own per-layer widths and its removed blocks and layers; LoRA wraps
whichever of the seven projections still exist, so the same code serves a base model, a
pruned one, and one whose attention blocks are all gone.

Training runs through the Hugging Face ``Trainer``: on one CPU or GPU as part of
``hgsp prune --finetune``, and on several GPUs with ``accelerate launch -m hgsp.cli finetune
...`` (data parallel; ``accelerate config`` adds DeepSpeed ZeRO or FSDP) with no code of its
own for distribution. The loss is the response-only loss of the Alpaca prompt format
(:mod:`hgsp.alpaca`), normalised by the number of response tokens in each optimizer step.

Outputs of a fine-tuned run (``results/{output_name}/``)::

    models/                          the fine-tuned model (merged LoRA), saved like a pruned one
    models/lora_adapter/             the LoRA adapter (peft format; applies to the model below)
    models/pruned_before_finetune/   the pruned model before fine-tuning (``hgsp prune`` only)
    logs/finetune_log.json           settings, data, loss per step, validation loss, time, memory
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .alpaca import DEFAULT_HUB_DATASET, FinetuneData, check_cutoff, collate, encode_all, \
    load_instructions, select_examples
from .data import hub_offline
from .errors import UserError

log = logging.getLogger(__name__)

METHODS = ("lora", "full")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Recovery after heavy pruning on a few hundred examples needs large steps: on the demo model
# pruned 50%, six LoRA steps at 1e-3 lower the validation loss 10.4 -> 8.6, at 2e-4 only to 10.1.
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}
WARMUP_FRACTION = 0.05  # of the optimizer steps: steadies Adam's first updates
PRUNED_SUBDIR = "pruned_before_finetune"
ADAPTER_SUBDIR = "lora_adapter"
LOG_FILE = "finetune_log.json"


@dataclass
class FinetuneSettings:
    """How to fine-tune; built from the ``--finetune_*`` / ``--lora_*`` flags."""

    method: str = "lora"
    samples: int = 500
    val_samples: int = 50
    data_path: str | None = None
    data_dir: str | None = None
    lr: float | None = None
    epochs: float = 2.0
    micro_batch: int = 4
    grad_accum: int = 4
    cutoff_len: int = 256
    gradient_checkpointing: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = ",".join(PROJECTIONS)
    seed: int = 42

    @classmethod
    def from_flags(cls, flags) -> "FinetuneSettings":
        """From any object with the flag attributes (a PruneConfig or an argparse namespace)."""
        return cls(method=flags.finetune_method, samples=flags.finetune_samples,
                   val_samples=flags.finetune_val_samples, data_path=flags.finetune_data_path,
                   data_dir=flags.data_dir, lr=flags.finetune_lr, epochs=flags.finetune_epochs,
                   micro_batch=flags.finetune_micro_batch, grad_accum=flags.finetune_grad_accum,
                   cutoff_len=flags.finetune_cutoff_len,
                   gradient_checkpointing=flags.finetune_gradient_checkpointing,
                   lora_r=flags.lora_r, lora_alpha=flags.lora_alpha,
                   lora_dropout=flags.lora_dropout, lora_target_modules=flags.lora_target_modules,
                   seed=flags.seed)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]

    def validate(self) -> None:
        """Check the settings without loading anything.

        Raises:
            UserError: naming the first bad flag.
        """
        if self.method not in METHODS:
            raise UserError(f"unknown --finetune_method '{self.method}': use lora or full")
        for flag, value in (("finetune_samples", self.samples), ("lora_r", self.lora_r),
                            ("finetune_micro_batch", self.micro_batch),
                            ("finetune_grad_accum", self.grad_accum)):
            if value < 1:
                raise UserError(f"--{flag} must be a positive integer")
        if self.val_samples < 0:
            raise UserError("--finetune_val_samples must be 0 or more")
        if self.cutoff_len < 2:
            raise UserError("--finetune_cutoff_len must be at least 2 tokens")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise UserError(f"--finetune_epochs {self.epochs} must be a positive number")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise UserError(f"--finetune_lr {self.lr} must be a positive number")
        if not self.lora_alpha > 0:
            raise UserError(f"--lora_alpha {self.lora_alpha} must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout {self.lora_dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if self.method == "lora" and (unknown or not self.targets):
            raise UserError(f"unknown --lora_target_modules '{','.join(unknown)}': use some of "
                            f"{','.join(PROJECTIONS)}")


def prepare(settings: FinetuneSettings, distributed_ok: bool = False) -> FinetuneData:
    """Validate the settings, load the data and pick the examples: before any slow work.

    Raises:
        UserError: bad settings, a missing or malformed data file, or too few records.
    """
    settings.validate()
    if not distributed_ok and _world_size() > 1:
        raise UserError("hgsp prune --finetune runs on one device: prune first, then launch "
                        "`accelerate launch -m hgsp.cli finetune --model RESULTS/NAME/models ...`")
    records = load_instructions(settings.data_path, settings.data_dir)
    needed = settings.samples + settings.val_samples
    if settings.data_path is None and len(records.records) < needed and not hub_offline():
        # the local demo sample (999 records) is a stand-in for the Hub set, not a limit
        log.info("the local Alpaca sample has %d records, %d are needed: trying the Hub "
                 "dataset %s", len(records.records), needed, DEFAULT_HUB_DATASET)
        try:
            records = load_instructions(DEFAULT_HUB_DATASET)
        except UserError as exc:  # no network or no `datasets`: the local error says more
            log.warning("%s", exc)
    return select_examples(records, settings.samples, settings.val_samples, settings.seed)


@dataclass
class LoraAdapter:
    """A trained LoRA adapter, kept apart from the merged model so it can be saved."""

    config: object  # peft.LoraConfig
    state: dict[str, torch.Tensor]


@dataclass
class FinetuneResult:
    """The fine-tuned model (LoRA merged), its adapter (LoRA only) and the training log."""

    model: nn.Module
    adapter: LoraAdapter | None
    log: dict = field(default_factory=dict)


def existing_targets(model: nn.Module, requested: list[str]) -> list[str]:
    """The requested projection names that still exist somewhere in the model.

    Raises:
        UserError: none of them exists (pruning removed every block that held them).
    """
    present = {name.rpartition(".")[2] for name, m in model.named_modules()
               if isinstance(m, nn.Linear)}
    kept = [t for t in requested if t in present]
    if not kept:
        raise UserError(f"none of --lora_target_modules {','.join(requested)} is left in the "
                        "model: choose others or use --finetune_method full")
    missing = [t for t in requested if t not in present]
    if missing:
        log.info("LoRA skips %s: pruning removed them everywhere", ",".join(missing))
    return kept


@torch.no_grad()
def response_loss(model: nn.Module, examples: list[dict], batch_size: int = 8,
                  pad_id: int = 0) -> float:
    """Mean loss per response token over ``examples`` (prompt and padding tokens ignored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits.float()
        labels = batch["labels"][:, 1:]
        total += nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                             ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def finetune(model: nn.Module, tokenizer, settings: FinetuneSettings,
             data: FinetuneData) -> FinetuneResult:
    """Fine-tune ``model`` (changed in place) on ``data`` as ``settings`` say.

    LoRA adapters are merged into the weights at the end, so the returned model has the
    same classes, shapes and config as the input.

    Args:
        model: a base or pruned causal LM, on the device to train on.
        tokenizer: its tokenizer (fast tokenizers give exact prompt/response boundaries).
        settings: method, optimisation and LoRA settings.
        data: training and validation records from :func:`prepare`.

    Returns:
        The fine-tuned model, the LoRA adapter (None for full fine-tuning) and the log.

    Raises:
        UserError: no example keeps a response token within the cutoff length, or no LoRA
            target projection is left in the model.
    """
    from transformers import set_seed

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    train = encode_all(tokenizer, data.train, settings.cutoff_len, "training")
    val = encode_all(tokenizer, data.val, settings.cutoff_len, "validation")
    set_seed(settings.seed)  # LoRA's random init happens before the Trainer seeds anything
    use_cache = getattr(model.config, "use_cache", None)
    trainable = _make_trainable(model, settings)
    n_trainable = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    record = _TrainingRecord(val, settings.micro_batch, pad_id)
    record.evaluate(trainable, "before")
    start = time.perf_counter()
    peak = _train(trainable, train, settings, pad_id, record)
    seconds = time.perf_counter() - start
    model, adapter = _finish(trainable, settings.method)
    if use_cache is not None:
        model.config.use_cache = use_cache
    record.evaluate(model, "after")
    ft_log = {"settings": asdict(settings), "learning_rate": settings.learning_rate,
              "data": _data_log(data, train, val), **record.as_dict(),
              "train_seconds": round(seconds, 2), "peak_memory": peak,
              "trainable_parameters": n_trainable}
    _log_outcome(ft_log)
    return FinetuneResult(model, adapter, ft_log)


def _make_trainable(model: nn.Module, settings: FinetuneSettings) -> nn.Module:
    """A peft-wrapped model (LoRA) or the model itself with every parameter trainable."""
    if settings.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=existing_targets(model, settings.targets))
    with warnings.catch_warnings():  # peft still asks for the deprecated checkpointing flag
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return get_peft_model(model, config)


class _TrainingRecord:
    """Loss per optimizer step and validation loss before, during (per epoch) and after."""

    def __init__(self, val: list[dict], batch_size: int, pad_id: int):
        self.val, self.batch_size, self.pad_id = val, batch_size, pad_id
        self.steps: list[dict] = []
        self.validation: list[dict] = []

    def evaluate(self, model: nn.Module, when: str, epoch: float | None = None) -> None:
        if not self.val:
            return
        loss = response_loss(model, self.val, self.batch_size, self.pad_id)
        self.validation.append({"when": when, "epoch": epoch, "loss": loss})
        log.info("validation loss (%s%s): %.4f", when,
                 "" if epoch is None else f" {epoch:.2f}", loss)

    def as_dict(self) -> dict:
        train_losses = [s["loss"] for s in self.steps if "loss" in s]
        return {"steps": self.steps, "validation": self.validation,
                "train_loss_first": train_losses[0] if train_losses else None,
                "train_loss_last": train_losses[-1] if train_losses else None}


def _callback(record: _TrainingRecord, total_steps: int):
    """A Trainer callback: log through ``logging``, keep the losses, validate every epoch."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=total_steps, desc="fine-tuning", unit="step",
                            disable=not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            entry = {"step": state.global_step, **{k: _plain(v) for k, v in (logs or {}).items()}}
            if "loss" in entry:
                record.steps.append(entry)
                every = max(1, total_steps // 10)
                if state.global_step % every == 0 or state.global_step == 1:
                    log.info("step %d/%d: loss %.4f, lr %.2e", state.global_step, total_steps,
                             entry["loss"], entry.get("learning_rate", float("nan")))

        def on_epoch_end(self, args, state, control, model=None, **kw):
            if state.global_step < total_steps:  # the last epoch is measured as "after"
                record.evaluate(model, "epoch", state.epoch)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return Callback()


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def _train(model: nn.Module, train: list[dict], settings: FinetuneSettings, pad_id: int,
           record: _TrainingRecord) -> dict:
    """Run the Trainer; returns the peak memory of the training itself."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .efficiency import peak_memory

    device = next(model.parameters()).device
    world = _world_size()
    per_epoch = math.ceil(math.ceil(len(train) / (settings.micro_batch * world))
                          / settings.grad_accum)
    total_steps = max(1, math.ceil(per_epoch * settings.epochs))
    with tempfile.TemporaryDirectory(prefix="hgsp-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, save_strategy="no", eval_strategy="no", report_to="none",
            per_device_train_batch_size=settings.micro_batch,
            gradient_accumulation_steps=settings.grad_accum,
            num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
            lr_scheduler_type="linear", warmup_steps=int(WARMUP_FRACTION * total_steps),
            weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, seed=settings.seed,
            activation_checkpointing=settings.gradient_checkpointing,
            # Non-reentrant checkpointing needs no input gradients, so frozen embeddings
            # (LoRA) work without peft's enable_input_require_grads hook.
            activation_checkpointing_kwargs={"use_reentrant": False},
            train_sampling_strategy="group_by_length",  # less padding: faster on CPU too
            use_cpu=device.type == "cpu", bf16=_use_bf16(model, device),
            remove_unused_columns=False, label_names=["labels"], disable_tqdm=True,
            dataloader_pin_memory=device.type == "cuda")
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=lambda batch: collate(batch, pad_id),
                          callbacks=[_callback(record, total_steps)])
        for noisy in (PrinterCallback, ProgressCallback):  # they print; we log
            trainer.remove_callback(noisy)
        log.info("fine-tuning (%s): %d examples, %g epochs, %d optimizer steps of %d x %d "
                 "examples%s, lr %.1e", settings.method, len(train), settings.epochs,
                 total_steps, settings.micro_batch, settings.grad_accum,
                 f" x {world} processes" if world > 1 else "", settings.learning_rate)
        with peak_memory(device) as peak:
            trainer.train()
        del trainer
    gc.collect()
    model.to(device)  # the Trainer may have moved it to its own default device
    return {"bytes": peak.get("peak_bytes"), "kind": peak.get("kind")}


def _use_bf16(model: nn.Module, device: torch.device) -> bool:
    """bf16 autocast on GPUs that support it; float32 on CPUs (bf16 matmuls are slow there)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported() and \
        next(model.parameters()).dtype in (torch.bfloat16, torch.float32)


def _finish(trainable: nn.Module, method: str) -> tuple[nn.Module, LoraAdapter | None]:
    """Switch checkpointing off, and for LoRA keep the adapter and merge it into the weights."""
    model = trainable
    adapter = None
    if method == "lora":
        from peft import get_peft_model_state_dict

        config = copy.deepcopy(trainable.peft_config["default"])
        config.inference_mode = True
        state = {k: v.detach().to("cpu", copy=True)
                 for k, v in get_peft_model_state_dict(trainable).items()}
        adapter = LoraAdapter(config, state)
        model = trainable.merge_and_unload()
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    model.requires_grad_(False)
    model.eval()
    return model, adapter


def _data_log(data: FinetuneData, train: list[dict], val: list[dict]) -> dict:
    n_tokens = sum(sum(t != -100 for t in e["labels"]) for e in train)
    return {"origin": data.origin, "available": data.available,
            "train_examples": len(train), "val_examples": len(val),
            "train_response_tokens": int(n_tokens),
            "train_indices": data.train_indices, "val_indices": data.val_indices}


def _log_outcome(ft_log: dict) -> None:
    val = {v["when"]: v["loss"] for v in ft_log["validation"]}
    peak = ft_log["peak_memory"]["bytes"]
    log.info("fine-tuned in %.1f s (peak memory %s); train loss %s -> %s; validation loss "
             "%s -> %s", ft_log["train_seconds"],
             "n/a" if peak is None else f"{peak / 2**30:.2f} GiB",
             _fmt(ft_log["train_loss_first"]), _fmt(ft_log["train_loss_last"]),
             _fmt(val.get("before")), _fmt(val.get("after")))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def save_adapter(adapter: LoraAdapter, folder: Path, base_model: str | None = None) -> None:
    """Write a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).

    ``base_model`` is recorded as the model the adapter applies to: the pruned model
    *before* fine-tuning (``PeftModel.from_pretrained(that_model, folder)`` rebuilds it).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(adapter.config)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in adapter.state.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_outputs(result: FinetuneResult, tokenizer, models_dir: Path, logs_dir: Path,
                 adapter_base: str | None, save_bin: bool = True) -> None:
    """The fine-tuned model in ``models_dir``, its adapter beside it, the log in ``logs_dir``."""
    from .save import save_pruned_model, write_json

    save_pruned_model(result.model, tokenizer, models_dir, save_bin)
    if result.adapter is not None:
        save_adapter(result.adapter, models_dir / ADAPTER_SUBDIR, adapter_base)
    write_json(logs_dir / LOG_FILE, result.log)


def summary_of(ft_log: dict) -> dict:
    """The few figures of the training log that go into ``summary.json``."""
    val = {v["when"]: v["loss"] for v in ft_log["validation"]}
    s = ft_log["settings"]
    return {"method": s["method"], "examples": ft_log["data"]["train_examples"],
            "data": ft_log["data"]["origin"], "epochs": s["epochs"],
            "learning_rate": ft_log["learning_rate"], "optimizer_steps": len(ft_log["steps"]),
            "train_loss_first": ft_log["train_loss_first"],
            "train_loss_last": ft_log["train_loss_last"],
            "val_loss_before": val.get("before"), "val_loss_after": val.get("after"),
            "train_seconds": ft_log["train_seconds"],
            "peak_memory_bytes": ft_log["peak_memory"]["bytes"],
            "log": f"logs/{LOG_FILE}"}


@contextmanager
def parked_on_cpu(module: nn.Module, active: bool):
    """Keep ``module`` (the base model, needed later only for evaluation) off the GPU."""
    if not active:
        yield
        return
    device = next(module.parameters()).device
    module.to("cpu")
    try:
        yield
    finally:
        module.to(device)


def finetune_stage(settings: FinetuneSettings, data: FinetuneData, pruned: nn.Module,
                   tokenizer, results, save_bin: bool,
                   keep_before: bool) -> tuple[nn.Module, nn.Module | None, dict]:
    """The ``--finetune`` stage of ``hgsp prune``, after the pruned model has been saved.

    The pruned model is fine-tuned in place; with ``keep_before`` a copy of it is kept (on
    the CPU while training) for the before/after evaluation.

    Returns:
        The fine-tuned model, the un-fine-tuned copy (or None) and the summary entry.
    """
    device = next(pruned.parameters()).device
    before = copy.deepcopy(pruned).to("cpu") if keep_before else None
    result = finetune(pruned, tokenizer, settings, data)
    adapter_base = str(results.final / "models" / PRUNED_SUBDIR)
    save_outputs(result, tokenizer, results.path("models"), results.path("logs"), adapter_base,
                 save_bin)
    if before is not None:
        before.to(device)
    return result.model, before, summary_of(result.log)


def _world_size() -> int:
    """Processes started by ``accelerate launch`` / ``torchrun`` (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _process_device(device: str) -> str:
    """Under ``accelerate launch`` every process trains on its own GPU."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return device


def _load_input(model_spec: str, dtype_name: str, device_name: str):
    """The model to fine-tune and its tokenizer, or a one-line UserError."""
    from .modelio import load_model, resolve_dtype
    from .pipeline import resolve_device

    inner = Path(model_spec).expanduser() / "models"
    if not (Path(model_spec).expanduser() / "config.json").exists() and \
            (inner / "config.json").is_file():
        raise UserError(f"'{model_spec}' is a results folder: pass its model, --model {inner}")
    device = resolve_device(_process_device(device_name))
    loaded = load_model(model_spec, resolve_dtype(dtype_name, device), device)
    if loaded.tokenizer is None:
        raise UserError(f"no tokenizer found with '{model_spec}': save one beside the model")
    return loaded, device


def finetune_command(model_spec: str, output_name: str, settings: FinetuneSettings,
                     results_dir: str = "results", overwrite: bool = False,
                     device: str = "auto", dtype: str = "auto", evaluation=None,
                     save_bin: bool = True) -> Path:
    """``hgsp finetune``: fine-tune a saved (pruned or base) model into a results folder.

    Writes ``results_dir/output_name/`` with ``models/`` (fine-tuned), ``models/lora_adapter/``,
    ``logs/finetune_log.json``, ``logs/config.json``, ``summary.json`` and, with
    ``evaluation`` (an :class:`hgsp.evaluate.EvalSettings`), ``evaluation/`` holding the model
    before (``pruned``) and after (``finetuned``) side by side. Everything is checked before
    the model is loaded; the folder appears only once the run has succeeded. Under
    ``accelerate launch`` every process trains and only the first one writes.

    Raises:
        UserError: bad flags, data, model path, or an existing result without ``overwrite``.
    """
    from .evaluate import check_data, evaluate_model, log_comparison, results_document
    from .save import ResultsDir, write_json

    main = int(os.environ.get("RANK", "0")) == 0
    if not re.fullmatch(r"[\w.\-]+", output_name) or output_name.startswith("."):
        raise UserError(f"--output_name '{output_name}' must be a plain folder name (letters, "
                        "digits, _ . -)")
    results = ResultsDir(results_dir, output_name, overwrite)
    results.check()
    data = prepare(settings, distributed_ok=True)
    if evaluation is not None:
        if _world_size() > 1:
            raise UserError("--run_evaluation needs a single process: evaluate afterwards with "
                            "`hgsp eval --model RESULTS/NAME/models`")
        check_data(evaluation)
    loaded, device = _load_input(model_spec, dtype, device)
    check_cutoff(loaded.tokenizer, data, settings.cutoff_len)  # before the "before" evaluation
    source = str(Path(model_spec).expanduser().resolve()) if Path(model_spec).exists() \
        else model_spec
    folder = model_spec if Path(model_spec).is_dir() else None
    before = None
    if evaluation is not None:  # measured first: the model is fine-tuned in place
        before = evaluate_model(loaded.model, loaded.tokenizer, evaluation, folder)
        before["source"] = source
    result = finetune(loaded.model, loaded.tokenizer, settings, data)
    if not main:
        return results.final
    with results:
        save_outputs(result, loaded.tokenizer, results.path("models"), results.path("logs"),
                     source, save_bin)
        summary = {"model": source, "finetune": summary_of(result.log)}
        if evaluation is not None:
            after = evaluate_model(result.model, loaded.tokenizer, evaluation,
                                   str(results.path("models")))
            after["source"] = str(results.final / "models")
            doc = results_document({"pruned": before, "finetuned": after}, evaluation, device)
            write_json(results.path("evaluation", "evaluation_results.json"), doc)
            log_comparison(doc)
            summary["evaluation"] = {"file": "evaluation/evaluation_results.json",
                                     "finetuned_ratios": doc["finetuned_ratios"]}
        write_json(results.path("summary.json"), summary)
        write_json(results.path("logs", "config.json"), _command_config(
            model_spec, settings, device, dtype, evaluation))
    return results.final


def _command_config(model_spec, settings, device, dtype, evaluation) -> dict:
    import platform

    import peft
    import transformers

    from . import __version__

    return {"model": model_spec, "finetune": asdict(settings),
            "evaluation": None if evaluation is None else asdict(evaluation),
            "resolved": {"device": device, "dtype": dtype},
            "versions": {"hgsp": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "python": platform.python_version()}}
