"""Calibration: the loops and hooks that turn batches into group importances (DESIGN.md §3).

The math lives in :mod:`hgsp.salience`; this module only gathers what it needs (summed
gradients, Fisher diagonals, input norms) over the calibration batches, in float32 whatever
dtype the model runs in.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .data import batches
from .errors import UserError
from .salience import GRADIENT_METHODS, METHODS, bias_input_norm, col_groups, row_groups, \
    weight_salience

log = logging.getLogger(__name__)

# (module path inside a decoder layer, how its weights map to groups, group width key)
ATTN_PARTS = (("self_attn.q_proj", "rows", "q"), ("self_attn.k_proj", "rows", "kv"),
              ("self_attn.v_proj", "rows", "kv"), ("self_attn.o_proj", "cols", "q"))
MLP_PARTS = (("mlp.gate_proj", "rows", "ch"), ("mlp.up_proj", "rows", "ch"),
             ("mlp.down_proj", "cols", "ch"))


@dataclass
class Importance:
    """Group importances: ``attn[l, g]`` for KV group g, ``mlp[l, j]`` for channel j."""

    attn: torch.Tensor
    mlp: torch.Tensor
    method: str
    tokens: int


def layer_linears(model: nn.Module, adapter: Adapter):
    """Yield ``(layer_index, part_path, axis, width_key, linear)`` for every prunable linear."""
    for index, layer in enumerate(adapter.layers(model)):
        for path, axis, key in ATTN_PARTS + MLP_PARTS:
            yield index, path, axis, key, layer.get_submodule(path)


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the device of the embedding, or, when accelerate offloads it
    (a meta tensor between forwards), the device its forward runs on."""
    embed = model.get_input_embeddings()
    if embed.weight.device.type == "meta" and hasattr(embed, "_hf_hook"):
        return torch.device(embed._hf_hook.execution_device)
    return embed.weight.device


def compute_importance(model: nn.Module, adapter: Adapter, method: str,
                       windows: torch.Tensor | None, batch_size: int,
                       gradient_checkpointing: bool = False,
                       sums_on_cpu: bool = False, passes: int = 1,
                       kv_group_scoring: str = "shared") -> Importance:
    """Importance of every attention group and MLP channel of ``model``.

    Args:
        windows: ``(n, seq_len)`` calibration token ids (unused for ``magnitude``).
        batch_size: windows per forward/backward pass.
        gradient_checkpointing: trade compute for activation memory in the backward pass.
        sums_on_cpu: keep the float32 gradient sums in CPU memory instead of beside the
            weights: the GPU then holds only the model and one pass's gradients.
        passes: gradient methods only: split the decoder layers into this many contiguous
            groups, with one pass over the calibration windows each, so that the gradient sums
            of one group only are held at a time. The importances are the same; the cost is
            the extra forward passes (each backward stops at the first layer of its group).
        kv_group_scoring: ``shared`` adds to a KV group the scores of the query heads that
            share its KV head (``q_proj`` rows, ``o_proj`` columns); ``positional`` those of
            the query heads at its position modulo the KV-head count, as LLM-Pruner's
            ``llama3.py`` folds them (:func:`fold_by_position`).
    """
    if method not in METHODS:
        raise UserError(f"unknown importance method '{method}': use one of {', '.join(METHODS)}")
    tokens = 0 if windows is None else windows.numel()
    d = adapter.dims()
    n_layers = len(adapter.layers(model))
    out = Importance(attn=torch.zeros(n_layers, d.num_kv_heads),
                     mlp=torch.zeros(n_layers, d.intermediate), method=method, tokens=tokens)
    if method not in GRADIENT_METHODS:
        stats = _input_norms(model, adapter, windows, batch_size) if method == "wanda" else {}
        _reduce_into(out, model, adapter, stats, range(n_layers), kv_group_scoring)
        return out
    for layers in layer_groups(n_layers, passes):
        stats = _gradient_stats(model, adapter, method, windows, batch_size,
                                gradient_checkpointing, sums_on_cpu, layers)
        _reduce_into(out, model, adapter, stats, layers, kv_group_scoring)
        del stats  # frees this group's sums before the next pass
    return out


def layer_groups(n_layers: int, passes: int) -> list[range]:
    """``passes`` contiguous, near-equal groups of layer indices, the last layers first."""
    if passes < 1:
        raise UserError(f"--gradient_passes must be at least 1, got {passes}")
    passes = min(passes, n_layers)
    bounds = [round(i * n_layers / passes) for i in range(passes + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])][::-1]


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss).all():
        raise UserError(f"{what} is NaN or Inf (numerical overflow): rerun with --dtype float32 "
                        "or bfloat16, or shorter --seq_len")


def _check_gradient(g: torch.Tensor) -> None:
    if not torch.isfinite(g).all():
        raise UserError("a calibration gradient is NaN or Inf (numerical overflow): "
                        "rerun with --dtype float32 or bfloat16")


def _gradient_stats(model, adapter, method, windows, batch_size, checkpointing,
                    sums_on_cpu: bool = False, layers=None) -> dict:
    """Summed gradients (and Fisher diagonals for taylor_2nd) of the prunable linears of
    ``layers`` (default: all); only they require gradients, so the backward pass stops at the
    first of them.

    Works on a model dispatched by accelerate (``--device_map``): the sums of a linear whose
    weights live on another GPU stay on that GPU, and those of a linear offloaded to the CPU or
    disk (its parameters are meta tensors between forwards) are kept on the CPU, fed by the
    gradients of the weights accelerate materialises for each forward (:class:`_BatchGrads`).
    """
    linears = [item for item in layer_linears(model, adapter)
               if layers is None or item[0] in layers]
    entries = [(index, path, pname, lin) for index, path, *_, lin in linears
               for pname, _ in lin.named_parameters()]
    # Flags by module and name: an offloaded parameter object is replaced at every forward.
    saved_flags = [(module, pname, p.requires_grad) for module in model.modules()
                   for pname, p in module.named_parameters(recurse=False)]
    for p in model.parameters():
        p.requires_grad_(False)  # no gradients for embeddings and norms: saves their memory
    for *_, lin in linears:
        lin.requires_grad_(True)

    def zeros(p):
        on_cpu = p.is_meta or sums_on_cpu
        return torch.zeros(p.shape, dtype=torch.float32, device="cpu" if on_cpu else p.device)

    fisher_needed = method == "taylor_2nd"

    def in_place(p):
        # Autograd already sums a float32 parameter's gradient over backward passes in
        # ``.grad``: using it as the sum saves a second copy of every prunable weight. The
        # Fisher diagonal needs each batch's gradient, other dtypes float32 sums.
        return not (fisher_needed or sums_on_cpu or p.is_meta) and p.dtype == torch.float32

    grad_sum = {(i, path, pname): None if in_place(p := getattr(lin, pname)) else zeros(p)
                for i, path, pname, lin in entries}
    for *_, lin in linears:
        for p in lin.parameters(recurse=False):
            p.grad = None
    fisher = {key: torch.zeros_like(g) for key, g in grad_sum.items()} if fisher_needed else None
    was_training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode; these models use no dropout
    n_batches = 0
    grads = _BatchGrads([lin for *_, lin in linears])
    try:
        total = -(-windows.shape[0] // batch_size)
        for ids, mask, labels in tqdm(batches(windows, batch_size), total=total,
                                      desc=f"importance ({method})", leave=False):
            dev = input_device(model)
            # The gradient of the batch's mean loss, one window at a time: activations are held
            # for one window only. Taylor_2nd squares each batch's gradient, so it runs whole.
            step = 1 if fisher is None else ids.shape[0]
            for start in range(0, ids.shape[0], step):
                part = slice(start, start + step)
                with grads.recording():
                    loss = model(input_ids=ids[part].to(dev), attention_mask=mask[part].to(dev),
                                 labels=labels[part].to(dev), use_cache=False).loss
                _check_finite(loss, "calibration loss")
                # Full windows: every window has the same number of predicted tokens.
                (loss * (ids[part].shape[0] / ids.shape[0])).backward()
                _pop_into(entries, grads, grad_sum, fisher)
            grads.clear()
            n_batches += 1
        for index, path, pname, lin in entries:
            if grad_sum[(index, path, pname)] is None:
                grad_sum[(index, path, pname)] = g = grads.pop(lin, pname)
                _check_gradient(g)
    finally:
        grads.close()
        for *_, lin in linears:  # an error mid-way must not leave summed gradients behind
            for p in lin.parameters(recurse=False):
                p.grad = None
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
        for module, pname, flag in saved_flags:
            getattr(module, pname).requires_grad_(flag)
    stats = {}
    for index, path, pname, _ in entries:
        item = {"grad": grad_sum[(index, path, pname)]}
        if fisher is not None:
            item["fisher"] = fisher[(index, path, pname)] / n_batches
        stats.setdefault(index, {})[(path, pname)] = item
    return stats


def _pop_into(entries, grads: "_BatchGrads", grad_sum: dict, fisher: dict | None) -> None:
    """Move the last backward pass's gradients into the float32 sums (and Fisher diagonals);
    parameters whose sum is their own ``.grad`` (``grad_sum`` entry None) are left alone."""
    for index, path, pname, lin in entries:
        key = (index, path, pname)
        if grad_sum[key] is None:
            continue  # summed in .grad, checked once at the end
        g = grads.pop(lin, pname).float().to(grad_sum[key].device)
        _check_gradient(g)
        grad_sum[key] += g
        if fisher is not None:
            fisher[key] += g * g


class _BatchGrads:
    """One batch's gradient of each prunable parameter, offloaded by accelerate or not.

    A resident parameter collects its gradient in ``.grad`` as usual. An offloaded one (an
    ``AlignDevicesHook`` with ``offload=True``: CPU or disk offload) is a meta tensor except
    during its module's forward, when accelerate swaps in a materialised copy that keeps the
    ``requires_grad`` flag; autograd then accumulates into that copy. Wrapping the hook's
    ``post_forward`` catches the copy just before accelerate puts the meta tensor back, so its
    gradient can be read after ``backward()``. Only copies made in the forward pass are caught:
    those made while gradient checkpointing re-runs the forward get no gradient.

    Memory: autograd keeps every copy until the backward pass ends, so offloading does not lower
    the peak of this pass: the offloaded prunable weights are all materialised on their
    execution device for a moment, as they would be without offload.
    """

    def __init__(self, linears):
        self._offloaded: dict[int, object] = {}
        self._seen: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._recording = False
        for lin in linears:
            if not any(p.is_meta for p in lin.parameters(recurse=False)):
                continue
            hook = getattr(lin, "_hf_hook", None)
            if not (getattr(hook, "offload", False) and hasattr(hook, "weights_map")):
                raise UserError("a prunable linear has weights on the meta device without an "
                                "accelerate offload hook of its own: load the model with "
                                "--device_map auto (or without --device_map)")
            hook.post_forward = self._catching(lin, hook.post_forward)
            self._offloaded[id(lin)] = hook

    def _catching(self, lin, post_forward):
        def wrapped(module, output):
            if self._recording:
                self._seen.setdefault(id(lin), []).append(
                    dict(module.named_parameters(recurse=False)))
            return post_forward(module, output)
        return wrapped

    @contextmanager
    def recording(self):
        """Catch the copies made during this block (the forward pass)."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def pop(self, lin, pname: str) -> torch.Tensor:
        """The gradient of ``lin.<pname>`` from the last backward pass (and forget it)."""
        if id(lin) in self._offloaded:
            # Dropping each copy once read frees it (and its gradient) as the loop goes on.
            copies = [seen.pop(pname, None) for seen in self._seen.get(id(lin), [])]
            found = [c.grad for c in copies if c is not None and c.grad is not None]
            grad = sum(found[1:], found[0]) if found else None
        else:
            p = getattr(lin, pname)
            grad, p.grad = p.grad, None
        if grad is None:
            raise RuntimeError(f"no gradient reached {pname} of a prunable linear "
                               f"({type(lin).__name__}) in the calibration pass")
        return grad

    def clear(self) -> None:
        self._seen.clear()

    def close(self) -> None:
        """Unwrap the hooks (their class's ``post_forward`` is used again)."""
        self.clear()
        for hook in self._offloaded.values():
            vars(hook).pop("post_forward", None)


@contextmanager
def onloaded(modules, device=None):
    """Context in which the weights accelerate offloads (CPU or disk offload: meta tensors
    between forwards) of ``modules`` are real tensors, on ``device`` or, by default, on the
    device their forward runs on; other modules are left as they are."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for module in modules:
            if has_offloaded_params(module):
                stack.enter_context(align_module_device(module, device))
        yield


@torch.no_grad()
def forward_windows(model: nn.Module, windows: torch.Tensor, batch_size: int, handles: list,
                    desc: str) -> None:
    """Run the windows through ``model`` for its hooks' sake, then remove the hooks."""
    try:
        total = -(-windows.shape[0] // batch_size)
        for ids, mask, _ in tqdm(batches(windows, batch_size), total=total, desc=desc,
                                 leave=False):
            dev = input_device(model)
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _input_norms(model, adapter, windows, batch_size) -> dict:
    """L2 norm of every input feature of every prunable linear, over all calibration tokens."""
    sq: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def make_hook(key):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)
            sq[key] = sq[key] + s if key in sq else s
        return hook

    for index, path, *_, lin in layer_linears(model, adapter):
        handles.append(lin.register_forward_hook(make_hook((index, path))))
    forward_windows(model, windows, batch_size, handles, "importance (wanda)")
    bias_norm = bias_input_norm(windows.numel())
    stats: dict[int, dict] = {}
    for (index, path), s in sq.items():
        stats.setdefault(index, {})[(path, "weight")] = {"input_norm": s.sqrt()}
        stats[index][(path, "bias")] = {"input_norm": bias_norm}
    return stats


def fold_by_position(per_head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Query-head scores summed onto KV groups by position: head ``j`` to group ``j % n_kv``.

    LLM-Pruner's ``llama3.py`` aligns a 9-head ``q_proj`` score with a 3-head ``k_proj`` one by
    summing it in blocks of the KV width, so KV head ``h`` gets query heads ``h, h+3, h+6``,
    while the group it removes holds heads ``3h..3h+2`` (those that share KV head ``h``)."""
    return per_head.view(-1, n_kv).sum(0)


@torch.no_grad()
def _reduce_into(out: Importance, model, adapter, stats: dict, layers,
                 kv_group_scoring: str = "shared") -> None:
    """Add the group importances of ``layers`` (from their ``stats``) into ``out``."""
    d = adapter.dims()
    widths = {"q": d.gqa_ratio * d.head_dim, "kv": d.head_dim, "ch": 1}
    if kv_group_scoring == "positional":  # per query head, then folded (below)
        widths["q"] = d.head_dim
    todo = [item for item in layer_linears(model, adapter) if item[0] in layers]
    for index, path, axis, key, lin in tqdm(todo, desc="group importance", leave=False):
        target = out.attn if path.startswith("self_attn") else out.mlp
        with onloaded([lin], "cpu"):  # where the sums of offloaded weights are
            for pname, p in lin.named_parameters():
                # A bias lies along the output rows even for o/down, whose bias no group owns.
                if pname == "bias" and axis == "cols":
                    continue
                extra = stats.get(index, {}).get((path, pname), {})
                extra = {k: v.to(p.device) for k, v in extra.items()}
                s = weight_salience(out.method, p.detach(), **extra)
                reduce = row_groups if axis == "rows" or pname == "bias" else col_groups
                groups = reduce(s, widths[key])
                if key == "q" and kv_group_scoring == "positional":
                    groups = fold_by_position(groups, d.num_kv_heads)
                target[index] += groups.cpu()
