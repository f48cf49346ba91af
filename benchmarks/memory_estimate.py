#!/usr/bin/env python
"""Peak memory of each stage of ``hgsp prune``, worked out from the model's shapes and the code.

    python benchmarks/memory_estimate.py                        # Llama-3-8B and Llama-3-70B
    python benchmarks/memory_estimate.py --config path/to/config.json [--config ...]
    python benchmarks/memory_estimate.py --batch 2 --seq_len 2048 --dtypes bf16

Prints a Markdown table (stage x model x dtype, GiB = 2^30 bytes) and writes JSON (default
``benchmarks/results/memory_estimate.json``) with every term of every formula. Nothing is loaded
or run: these are estimates, not measurements.

Notation: P = all parameters (tied weights once), P_lin = parameters of the prunable linears
(q, k, v, o, gate, up, down of every layer, biases included), b = bytes per value of the model
dtype (2 for bf16, 4 for fp32), L layers, h hidden size, nq / nkv query / KV heads, d head_dim,
I intermediate size, V vocabulary, B = --gradient_batch_size, T = --seq_len,
Ba = --analysis_batch_size, r = --pruning_ratio.

Stages, as the code does them (the base model stays in memory for the whole run):

- load (``modelio.load_model``): the weights, W = P·b. transformers fills a meta-initialised
  model from the safetensors files, so nothing else is kept. (A GGUF file is first de-quantized
  to a float32 model: add P·4 while both exist.)
- calibration (``importance._gradient_stats``, taylor): requires_grad only on the prunable
  linears of one group of layers (``--gradient_passes`` N: one pass per group, the largest
  group's share g = ceil(L/N)/L), so no gradients for embeddings, norms or other groups. A
  gradient batch runs one window at a time (T tokens; taylor_2nd runs it whole, B·T). Held
  throughout: W and the float32 sums S = g·P_lin·4; a float32 model sums in its own ``.grad``,
  so that is all, plus one window's activations and loss. Other dtypes (and
  ``--gradient_sums_on_cpu``) also hold one window's gradients in the model dtype, G = g·P_lin·b,
  with the loop's temporaries on the largest matrix M (``p.grad.float()``: 4·M in bf16;
  ``isfinite``: 1·M); taylor_2nd adds the Fisher sums (S again, and at the end divides them into
  a new tensor, another S) and its ``g*g`` (4·M). Where both exist, the peak is the larger of
  the two ends of the backward pass (in between, activations are freed as gradients appear):
    * start: the activations autograd saved for the window plus the loss;
    * end: the gradients and the loop temporaries.
  Activations per token and layer without checkpointing (transformers' LlamaDecoderLayer with
  SDPA): a_layer = 2·(4h + 4) [the two RMSNorms keep their float32 input and 1/rms] + 2·h·b
  [normed inputs of q/k/v and of gate/up] + (nq·d + 2·nkv·d)·b [SDPA's q, k and v after RoPE;
  full windows need no mask, so GQA runs without repeating k/v] + 4·nq [SDPA's logsumexp] +
  nq·d·b [SDPA's output, which is also o_proj's input] + 4·I·b [gate and up outputs, SiLU
  output, their product]. This matches, tensor for tensor, what autograd saves in
  transformers 5.23 / torch 2.13 (checked by walking the saved tensors of the graph on a small
  random model; layer 0 saves 4h + 4 less, its input needing no gradient).
  No attention matrix is kept (SDPA's flash / memory-efficient kernels; the eager
  implementation would add 2·nq·T·b per token and layer).
  Without checkpointing: A = T·(L·a_layer + 4h); with --use_gradient_checkpointing (whole
  decoder layers, non-reentrant): A = T·(L·h·b + a_layer + 4h): every layer keeps only its
  input and one layer is recomputed at a time. Plus the backward's working set on one layer,
  T·(3·I + 2·h)·b, and the loss: T·V·(12 + b) bytes in bf16, T·V·12 in fp32 (float32
  log-softmax kept for the backward, its gradient and the logits' gradient, plus the cast back).
- analysis (``analysis.removal_analysis``, no gradients): W, the inputs of all L layers for one
  batch of Ba windows (L·Ba·T·h·b), twice when there are two or more batches (the previous
  batch's list is still referenced while the next one is captured), the largest transient of one
  layer (Ba·T·(3·I + 4·h)·b) and one vocabulary slice of logits (``analysis.head_nll``: 1,024
  rows) with its float32 copy and exp, Ba·T·1024·(b + 8), plus the gathered target rows of the
  head, Ba·T·h·b.
- surgery (``surgery.apply_plan``): W plus the pruned model, which is built from sliced copies
  into a meta-initialised model (no second copy): W_pruned = (1 − r)·P·b, plus V·h·b for a model
  with tied embeddings (the embedding and lm_head entries of the state dict are cloned
  separately until ``tie_weights``). r counts all parameters, as ``--pruning_ratio`` does.
  With ``--refit_outputs`` (default) the surgery is preceded by the refit
  (``reconstruction.refit_outputs``), which holds its statistics in host RAM whatever the
  device: the float64 E[x xᵀ] of the narrowed blocks, 8·(nq·d)² or 8·I² bytes each, at most
  4 GiB at a time (``GRAM_BUDGET_BYTES``; more blocks take more calibration passes, a block over
  the budget gets a pass of its own), plus about three (I+1)² float64 matrices for one solve.
  Not in the table: I = 14,336 (Llama-3-8B) gives 1.5 GiB per MLP block and 4.6 GiB for the
  solve; I = 28,672 (Llama-3-70B) 6.1 and 18.4 GiB. ``--no-refit_outputs`` needs none of it.
- save (``save.save_pruned_model``): W + W_pruned; safetensors (0.8) and ``torch.save`` write
  from the tensors' memory without another copy on the CPU. On a GPU, ``pruned_model.bin`` first
  copies the pruned weights to host RAM (W_pruned of RAM, not of GPU memory).

Everything is counted on one device (CPU RAM, or one GPU), as with ``--device cpu`` or
``--device cuda``. With ``--device_map`` the same totals are spread over the devices; offloaded
prunable weights are still materialised on the execution device during the calibration pass
(autograd keeps each copy until the backward ends). Not counted: the CUDA context and caching
allocator slack (≈0.5–1 GiB on a GPU), Python and library overhead (≈0.5 GiB), the tokenizer,
the calibration token ids, and the page cache of memory-mapped checkpoint files. On a random
155M-parameter llama on the CPU (B·T = 1,024, analysis 8 × 256), the measured rise of peak RSS
over the loaded model was 70–330 MiB above these formulas: allocator and library overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from hgsp.atomic import atomic_write  # noqa: E402  (torch-free)

GIB = 2 ** 30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}

LLAMA_3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
              "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}
LLAMA_3_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
               "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False}
BUILT_IN = {"Llama-3-8B": LLAMA_3_8B, "Llama-3-70B": LLAMA_3_70B}


def _defaults() -> dict:
    """The calibration and analysis defaults of ``hgsp prune`` (read from PruneConfig)."""
    names = {"gradient_batch_size": 4, "gradient_passes": 2, "seq_len": 128,
             "analysis_batch_size": 8, "analysis_samples": 16, "pruning_ratio": 0.5}
    try:
        from hgsp.config import PruneConfig

        fields = PruneConfig.__dataclass_fields__
        return {name: fields[name].default for name in names}
    except Exception:  # noqa: BLE001 - the script also works without the package installed
        return names


@dataclass
class Shape:
    """What the formulas need from a config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "llama")
        return cls(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                   qk_norm=model_type == "qwen3", mlp_bias=bool(cfg.get("mlp_bias", False)))

    def linears(self) -> dict[str, int]:
        """Parameters of each prunable linear of one layer (weights and biases)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        qb, mb = int(self.qkv_bias), int(self.mlp_bias)
        return {"q_proj": h * q + qb * q, "k_proj": h * kv + qb * kv, "v_proj": h * kv + qb * kv,
                "o_proj": q * h, "gate_proj": h * i + mb * i, "up_proj": h * i + mb * i,
                "down_proj": i * h + mb * h}

    def prunable_params(self) -> int:
        return self.layers * sum(self.linears().values())

    def largest_matrix(self) -> int:
        return max(self.linears().values())

    def total_params(self) -> int:
        per_layer = sum(self.linears().values()) + 2 * self.hidden \
            + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


def activations_per_token_layer(s: Shape, b: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing)."""
    norms = 2 * (4 * s.hidden + 4)
    normed = 2 * s.hidden * b
    sdpa = (s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim) * b + 4 * s.heads
    o_in = s.heads * s.head_dim * b  # SDPA's output, saved by SDPA and by o_proj: one tensor
    mlp = 4 * s.intermediate * b
    return norms + normed + sdpa + o_in + mlp


def estimate(s: Shape, dtype: str, batch: int, seq_len: int, analysis_batch: int,
             analysis_samples: int, ratio: float, passes: int = 1) -> dict:
    """Every stage's peak in bytes, with the terms it is made of."""
    b = DTYPE_BYTES[dtype]
    P, P_lin, M = s.total_params(), s.prunable_params(), s.largest_matrix()
    W = P * b
    a_layer = activations_per_token_layer(s, b)

    def acts(tokens: int) -> dict:
        loss = tokens * s.vocab * (12 + (b if b < 4 else 0))
        work = tokens * (3 * s.intermediate + 2 * s.hidden) * b
        return {"plain": tokens * (s.layers * a_layer + 4 * s.hidden) + work + loss,
                "checkpointing": tokens * (s.layers * s.hidden * b + a_layer + 4 * s.hidden)
                + work + loss}

    # taylor runs a gradient batch one window at a time; taylor_2nd runs it whole.
    window, whole = acts(seq_len), acts(batch * seq_len)
    # One pass per group of layers: the largest group's share of the prunable linears.
    group = -(-s.layers // max(1, min(passes, s.layers))) / s.layers
    G = round(P_lin * group) * b
    S = round(P_lin * group) * 4
    loop_tmp = (4 * M if b < 4 else 0) + M  # p.grad.float() copy, isfinite mask

    def calibration(act: int, second_order: bool, sums_on_cpu: bool = False) -> dict:
        sums = 2 * S if second_order else S
        if b == 4 and not (second_order or sums_on_cpu):
            # float32: the sums are the parameters' own .grad, there is no second copy
            end = M  # the isfinite mask of the final check
        else:
            end = G + loop_tmp + (4 * M if second_order else 0)
        # --gradient_sums_on_cpu: the sums live in host memory, the device holds the rest
        peak = W + (0 if sums_on_cpu else sums) + max(act, end)
        if second_order and not sums_on_cpu:  # after the loop: sums, Fisher, Fisher / n
            peak = max(peak, W + 3 * S)
        return {"bytes": peak, "weights": W, "grad_sums_fp32": sums, "activations_and_loss": act,
                "grads_model_dtype_and_loop_temporaries": end, "sums_on_cpu": sums_on_cpu,
                "layer_share_per_pass": group}

    # Window length (T: taylor runs one window at a time) above which the activations, not
    # the gradients, set the peak, i.e. where --use_gradient_checkpointing starts to lower it.
    per_token = (s.layers * a_layer + 4 * s.hidden + (3 * s.intermediate + 2 * s.hidden) * b
                 + s.vocab * (12 + (b if b < 4 else 0)))
    crossover = -(-(G + loop_tmp) // per_token) if b < 4 else 0
    n_analysis_batches = -(-analysis_samples // analysis_batch)
    a_tokens = analysis_batch * seq_len
    cached = min(2, n_analysis_batches) * s.layers * a_tokens * s.hidden * b
    analysis_tmp = a_tokens * (3 * s.intermediate + 4 * s.hidden) * b
    # logits of one vocabulary slice (analysis.VOCAB_CHUNK rows), float32 copy and exp, and
    # the gathered target rows of the head
    analysis_logits = a_tokens * min(s.vocab, 1024) * (b + 8) + a_tokens * s.hidden * b
    W_pruned = round((1 - ratio) * P) * b
    tied_tmp = s.vocab * s.hidden * b if s.tied else 0
    return {
        "load": {"bytes": W, "weights": W},
        "calibration": calibration(window["plain"], False),
        "calibration_checkpointing": calibration(window["checkpointing"], False),
        "calibration_taylor_2nd": calibration(whole["plain"], True),
        "calibration_sums_on_cpu": calibration(window["plain"], False, sums_on_cpu=True),
        "analysis": {"bytes": W + cached + analysis_tmp + analysis_logits, "weights": W,
                     "cached_layer_inputs": cached, "layer_transient": analysis_tmp,
                     "logits": analysis_logits},
        "surgery": {"bytes": W + W_pruned + tied_tmp, "weights": W, "pruned_weights": W_pruned,
                    "tied_embedding_clone": tied_tmp},
        "save": {"bytes": W + W_pruned, "weights": W, "pruned_weights": W_pruned},
        "checkpointing_lowers_calibration_peak_above_window_tokens": crossover,
    }


STAGE_LABELS = {
    "load": "load (weights)",
    "calibration": "calibration, taylor",
    "calibration_checkpointing": "calibration, taylor + gradient checkpointing",
    "calibration_taylor_2nd": "calibration, taylor_2nd",
    "calibration_sums_on_cpu": "calibration, taylor + --gradient_sums_on_cpu (device memory)",
    "analysis": "removal analysis",
    "surgery": "surgery (base + pruned)",
    "save": "save",
}


def markdown(results: dict, dtypes: list[str]) -> str:
    cols = [(name, dt) for name in results["models"] for dt in dtypes]
    head = "| stage | " + " | ".join(f"{n} {dt}" for n, dt in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for stage, label in STAGE_LABELS.items():
        cells = [f"{results['models'][n]['stages'][dt][stage]['bytes'] / GIB:.1f}"
                 for n, dt in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    d = _defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="a config.json (or a model folder holding one); repeatable. "
                             "Without it: Llama-3-8B and Llama-3-70B")
    parser.add_argument("--with_builtin", action="store_true",
                        help="also show Llama-3-8B and -70B when --config is given")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--batch", type=int, default=d["gradient_batch_size"],
                        help="--gradient_batch_size (default: hgsp's)")
    parser.add_argument("--passes", type=int, default=d["gradient_passes"],
                        help="--gradient_passes (default: hgsp's)")
    parser.add_argument("--seq_len", type=int, default=d["seq_len"])
    parser.add_argument("--analysis_batch", type=int, default=d["analysis_batch_size"])
    parser.add_argument("--analysis_samples", type=int, default=d["analysis_samples"])
    parser.add_argument("--ratio", type=float, default=d["pruning_ratio"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "memory_estimate.json"))
    args = parser.parse_args(argv)
    dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    unknown = set(dtypes) - set(DTYPE_BYTES)
    if unknown:
        parser.error(f"unknown --dtypes {sorted(unknown)}: use bf16, fp32")

    configs = dict(BUILT_IN) if not args.config or args.with_builtin else {}
    for spec in args.config:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
        cfg = json.loads(path.read_text())
        configs[path.parent.name if path.name == "config.json" else path.stem] = cfg

    settings = {"gradient_batch_size": args.batch, "gradient_passes": args.passes,
                "seq_len": args.seq_len,
                "analysis_batch_size": args.analysis_batch,
                "analysis_samples": args.analysis_samples, "pruning_ratio": args.ratio}
    results = {"settings": settings, "unit": "bytes", "models": {}}
    for name, cfg in configs.items():
        shape = Shape.from_config(cfg)
        results["models"][name] = {
            "shape": asdict(shape), "parameters": shape.total_params(),
            "prunable_parameters": shape.prunable_params(),
            "stages": {dt: estimate(shape, dt, args.batch, args.seq_len, args.analysis_batch,
                                    args.analysis_samples, args.ratio, args.passes)
                       for dt in dtypes}}

    print(f"Peak memory per stage, GiB (batch {args.batch} x {args.seq_len} tokens, "
          f"{args.passes} gradient passes, analysis batch {args.analysis_batch}, ratio "
          f"{args.ratio}):\n")
    print(markdown(results, dtypes))
    for name, entry in results["models"].items():
        key = "checkpointing_lowers_calibration_peak_above_window_tokens"
        cross = ", ".join(f"{dt} {entry['stages'][dt][key]:,}" for dt in dtypes)
        print(f"\n{name}: {entry['parameters']:,} parameters, {entry['prunable_parameters']:,} "
              f"in prunable linears; gradient checkpointing lowers the calibration peak only "
              f"above --seq_len = {cross} tokens (0: at any length)")
    out = Path(args.out)
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
