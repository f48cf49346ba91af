"""Size and speed of a model: parameters, MACs, bytes, prefill latency, decode speed, memory.

Timings are medians over repeats after a warm-up, greedy decoding with the KV cache, the
same prompt for every model, so a base and a pruned model measured in one process compare
fairly. Peak memory is the CUDA allocator's peak on a GPU and the process's resident set size
(sampled while the model runs) on a CPU. Both count whatever else the process holds (the
other model of a comparison, Python, torch), so the figure compared between models is the
model's own: its weights plus what running it added above the memory in use when it started
(activations, KV cache). On a CPU that growth is a lower bound, as freed memory is reused.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def parameter_counts(model) -> dict:
    """Total parameters (tied once) and those outside the embedding and output layers."""
    total = sum(p.numel() for p in model.parameters())
    io = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    out = model.get_output_embeddings()
    if out is not None:
        io[id(out.weight)] = out.weight.numel()
    return {"total": total, "non_embedding": total - sum(io.values())}


def macs_per_token(model, context: int) -> dict:
    """Multiply-accumulates to produce one token at a given context length.

    ``linear`` counts every weight matrix once (in × out MACs per token, lm_head included);
    ``attention`` adds QKᵀ and AV over ``context`` cached positions in every layer that attends.
    """
    linear = 0
    attention = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.in_features * module.out_features
    for layer in model.model.layers:
        q_proj = getattr(getattr(layer, "self_attn", None), "q_proj", None)
        if q_proj is not None:
            attention += 2 * q_proj.out_features * context  # QKᵀ and AV, per query row
    return {"linear": linear, "attention": attention, "total": linear + attention,
            "context": context}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def folder_bytes(folder: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files (safetensors, else .bin) in a saved model folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files) or None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Yield a dict that holds the peak bytes in use while the block ran."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["start_bytes"] = torch.cuda.memory_allocated(device)
        yield result
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["kind"] = "cuda_allocator"
        return
    if not os.path.exists("/proc/self/statm"):
        yield result
        result["peak_bytes"], result["kind"] = None, "unavailable"
        return
    peak = [_rss_bytes()]
    result["start_bytes"] = peak[0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_bytes"] = max(peak[0], _rss_bytes())
        result["kind"] = "process_rss"


def _timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def speed(model, prompt_len: int = 128, new_tokens: int = 32, batch_sizes=(1, 8),
          repeats: int = 3, seed: int = 0) -> dict:
    """Prefill latency and decode tokens/s with the KV cache.

    Decode speed is ``batch × new_tokens`` over the time of generating ``new_tokens + 1``
    tokens minus the time of generating 1 (the prefill), so it counts decode steps only.
    """
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    result = {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}
    for batch in tqdm(batch_sizes, desc="speed (batch sizes)", leave=False):
        ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)

        def generate(n):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)

        generate(2)  # warm-up
        prefill = _timed(lambda: model(ids, use_cache=False), device, repeats)
        first = _timed(lambda: generate(1), device, repeats)
        full = _timed(lambda: generate(new_tokens + 1), device, repeats)
        result[f"batch{batch}"] = {
            "prefill_latency_s": prefill,
            "decode_tokens_per_s": batch * new_tokens / max(full - first, 1e-9),
        }
    return result


def efficiency(model, folder: str | None = None, prompt_len: int = 128, new_tokens: int = 32,
               batch_sizes=(1, 8), repeats: int = 3) -> dict:
    """Every efficiency figure of one model."""
    device = model.get_input_embeddings().weight.device
    log.info("efficiency: timing batch sizes %s, %d repeats each", list(batch_sizes), repeats)
    with peak_memory(device) as mem:
        timing = speed(model, prompt_len, new_tokens, batch_sizes, repeats)
    weights = weight_bytes(model)
    if mem.get("peak_bytes") is not None:
        mem["model_bytes"] = weights + max(0, mem["peak_bytes"] - mem["start_bytes"])
    return {
        "parameters": parameter_counts(model),
        "macs_per_token": macs_per_token(model, context=prompt_len),
        "weight_bytes": weights,
        "disk_bytes": folder_bytes(folder),
        "speed": timing,
        "peak_memory": mem,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def ratios(pruned: dict, base: dict) -> dict:
    """Pruned ÷ base for every comparable efficiency figure (speed-ups > 1 are faster)."""
    out = {
        "parameters": pruned["parameters"]["total"] / base["parameters"]["total"],
        "macs_per_token": pruned["macs_per_token"]["total"] / base["macs_per_token"]["total"],
        "weight_bytes": pruned["weight_bytes"] / base["weight_bytes"],
    }
    if pruned.get("disk_bytes") and base.get("disk_bytes"):
        out["disk_bytes"] = pruned["disk_bytes"] / base["disk_bytes"]
    for key, value in pruned["speed"].items():
        if key.startswith("batch") and key in base["speed"]:
            b = base["speed"][key]
            out[f"{key}_prefill_speedup"] = b["prefill_latency_s"] / value["prefill_latency_s"]
            out[f"{key}_decode_speedup"] = value["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    # the models' own memory; a process peak also holds the other model (older results files
    # have only that, and get no ratio)
    pm, bm = pruned["peak_memory"].get("model_bytes"), base["peak_memory"].get("model_bytes")
    if pm and bm:
        out["model_memory"] = pm / bm
    return out


def pass_orders(items: list, passes: int) -> list[list]:
    """The order of ``items`` in each of ``passes`` timing passes: forward, backward, forward,
    ... so that a drift of a shared machine's speed during a session does not favour the items
    timed first."""
    return [list(items)[:: 1 if p % 2 == 0 else -1] for p in range(passes)]


def median_of_passes(passes: list[dict]) -> dict:
    """One :func:`efficiency` result from several passes over the same model.

    Speed on a shared machine drifts within a session, so a benchmark times every model more
    than once, in alternating order; each speed figure becomes the median of its passes (kept
    in ``speed["passes"]`` for the record) and the peak memory the largest seen. Sizes and
    MACs do not depend on the pass and come from the first.
    """
    if not passes:
        raise ValueError("median_of_passes needs at least one pass")
    out = {**passes[0], "speed": dict(passes[0]["speed"])}
    for key, first in passes[0]["speed"].items():
        if key.startswith("batch"):
            out["speed"][key] = {m: statistics.median(p["speed"][key][m] for p in passes)
                                 for m in first}
    out["speed"]["passes"] = [{k: v for k, v in p["speed"].items() if k.startswith("batch")}
                              for p in passes]
    peaks = [p["peak_memory"].get("peak_bytes") for p in passes]
    if all(peaks):  # the pass with the largest peak, its figures together
        worst = max(passes, key=lambda p: p["peak_memory"]["peak_bytes"])["peak_memory"]
        own = [p["peak_memory"].get("model_bytes") for p in passes]
        out["peak_memory"] = {**worst, **({"model_bytes": max(own)} if all(own) else {})}
    return out
