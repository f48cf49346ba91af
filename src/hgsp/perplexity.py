"""Perplexity in the field's convention (DESIGN.md §8).

The split's documents are joined with blank lines and tokenized once (the tokenizer's default
special tokens, as LLM-Pruner and GPTQ do), cut into non-overlapping windows of ``seq_len``
tokens (the tail shorter than a window is dropped), and ``PPL = exp(total NLL / predicted
tokens)``, where each window predicts its tokens 2..seq_len. The window length goes with every
number: 128 is LLM-Pruner's convention, 2048 SliceGPT's and SLEB's.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from .analysis import head_nll, summed_nll
from .data import Corpus, load_corpus
from .errors import UserError

log = logging.getLogger(__name__)

# Evaluation set -> (corpus, split) it is scored on. PTB is reported on both splits in the
# literature (LLM-Pruner's tables use validation), so both are offered.
EVAL_SPLITS = {"wikitext2": ("wikitext2", "test"), "ptb": ("ptb", "test"),
               "ptb_val": ("ptb", "validation"), "c4": ("c4", "validation")}


def eval_token_ids(tokenizer, corpus: Corpus) -> torch.Tensor:
    return tokenizer("\n\n".join(corpus.documents), return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
                      batch_tokens: int = 4096) -> dict:
    """Perplexity of a token stream cut into ``seq_len`` windows.

    Args:
        max_windows: evaluate only the first windows (a quick look; recorded as ``capped``).
        batch_tokens: tokens per forward pass (windows are batched up to this many).
    """
    available = ids.numel() // seq_len
    if available == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    n = available if max_windows is None else min(available, max_windows)
    windows = ids[: n * seq_len].view(n, seq_len)
    per_batch = max(1, batch_tokens // seq_len)
    device = model.get_input_embeddings().weight.device
    nll, predicted = 0.0, 0
    batch_nll = nll_function(model)
    was_training = model.training
    model.eval()
    for batch in tqdm(torch.split(windows, per_batch), desc=f"perplexity@{seq_len}", leave=False):
        batch = batch.to(device)
        nll += batch_nll(model, batch)
        predicted += batch[:, 1:].numel()
    model.train(was_training)
    return {"ppl": math.exp(nll / predicted), "nll": nll, "predicted_tokens": predicted,
            "windows": n, "available_windows": available, "seq_len": seq_len,
            "max_windows": max_windows, "capped": n < available}


def sliced_nll(model, batch: torch.Tensor) -> float:
    """Summed NLL of a batch scored from the final hidden states with the vocabulary-sliced
    head (:func:`head_nll`): the number full logits give, without the (tokens, vocab) tensor,
    which is 0.8 GB per batch on a 49k vocabulary and a quarter of the time on a CPU."""
    hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state
    return head_nll(model.lm_head, hidden, batch)


def logits_nll(model, batch: torch.Tensor) -> float:
    """Summed NLL of a batch from the model's own forward (full logits)."""
    return summed_nll(model(input_ids=batch, use_cache=False).logits, batch)


def nll_function(model):
    """:func:`sliced_nll` for a plain transformers causal LM; :func:`logits_nll` for anything
    else (a PEFT wrapper, whose ``.model`` is not the decoder; logit soft-capping)."""
    from transformers import PreTrainedModel

    decoder = getattr(model, "model", None)
    plain = (isinstance(model, PreTrainedModel) and isinstance(decoder, PreTrainedModel)
             and type(model).__name__.endswith("ForCausalLM")
             and getattr(model, "lm_head", None) is not None
             and not getattr(model.config, "final_logit_softcapping", None))
    return sliced_nll if plain else logits_nll


def perplexity(model, tokenizer, dataset: str, seq_len: int, max_windows: int | None = None,
               data_dir: str | None = None) -> dict:
    """Perplexity of ``model`` on the evaluation split of ``dataset``."""
    corpus = load_corpus(*EVAL_SPLITS[dataset], data_dir)
    result = perplexity_of_ids(model, eval_token_ids(tokenizer, corpus), seq_len, max_windows)
    result.update(dataset=dataset, split=corpus.split, source=corpus.origin)
    log.info("%s/%s @%d: ppl %.3f over %d windows", dataset, corpus.split, seq_len,
             result["ppl"], result["windows"])
    return result
