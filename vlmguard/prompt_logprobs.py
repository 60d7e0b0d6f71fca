"""Prompt log-probabilities (``GenerationSpec.prompt_logprobs``; vLLM's ``prompt_logprobs``, what OpenAI's legacy
completions return with ``echo`` and ``logprobs``): for each token of a request's prompt, its log-probability given
the tokens before it, with the most likely tokens at its place.

They are the model's own: one pass of the language model over the whole prompt, every visual token seen (no pruner
cuts one), without a decoder's contrast, a penalty or a logit bias: what a scoring harness (lm-eval's log-likelihood
tasks) compares between continuations. The pass is apart from the request's prefill, which computes the last
position's logits only (and may prune, share prefixes or take them from the prefix cache), so a request that asks
for them costs one more prefill of its prompt, its image's vision tower and projector included (the prefill's
features are not kept for it); its answer is the same as without them.

The first token has nothing before it and an image's tokens are features, not tokens the model predicts: their
entries have no log-probability (None) and no alternatives.
"""
from __future__ import annotations

import torch

from vlmguard.results import TokenLogprob
from vlmguard.sequence import Seq
from vlmguard.token_text import LOGPROB_FLOOR, TokenPieces, entry_log_softmax, logprob_entry

POSITIONS_PER_PASS = 256  # the prompt positions whose log-softmax over the vocabulary is held at once


def row_prompt_logprobs(logits_of, hidden: torch.Tensor, ids: torch.Tensor, seq: Seq, row: int, k: int,
                        pieces: TokenPieces) -> list[TokenLogprob]:
    """Row ``row``'s entries, one per token it was fed (its padding left out), from ``hidden`` (the final norm's
    output at each position, ``LayerRunner.final_hidden``) and ``logits_of`` (hidden -> fp32 logits over the ids the
    tokenizer has); ``ids``: the row's input ids; ``k``: the alternatives to list."""
    where = seq.valid[row].nonzero().squeeze(1)
    h, tokens = hidden[row, where], ids.to(where.device)[where]
    visual = (seq.visual[row, where] >= 0).tolist()
    token_list = tokens.tolist()
    own: list[float] = []
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    for start in range(0, len(token_list) - 1, POSITIONS_PER_PASS):  # position p scores token p + 1
        stop = min(start + POSITIONS_PER_PASS, len(token_list) - 1)
        lp = entry_log_softmax(logits_of(h[start:stop]))
        nxt = tokens[start + 1:stop + 1]
        inside = nxt < lp.shape[-1]  # (an id past the scored vocabulary: an added token the lm_head has no row for)
        mine = lp.gather(1, nxt.clamp(max=lp.shape[-1] - 1)[:, None]).squeeze(1).masked_fill(~inside, LOGPROB_FLOOR)
        kk = min(k, lp.shape[-1])
        values, index = lp.topk(kk, dim=-1) if kk else (lp[:, :0], lp[:, :0].long())
        more_likely = (lp > mine[:, None]).sum(dim=1)
        # one device sync for the four (float64 holds the float32 log-probabilities, ids and counts exactly)
        read = torch.cat([mine[:, None].double(), more_likely[:, None].double(), values.double(), index.double()],
                         dim=1).tolist()
        own += [(r[0], 1 + int(r[1])) for r in read]
        top_v += [r[2:2 + kk] for r in read]
        top_i += [[int(i) for i in r[2 + kk:]] for r in read]
    out = [logprob_entry(pieces, token_list[0], None)]
    for p, t in enumerate(token_list[1:]):
        if visual[p + 1]:
            out.append(logprob_entry(pieces, t, None))
            continue
        entry = logprob_entry(pieces, t, own[p][0], top_i[p], top_v[p])
        entry.rank = own[p][1]
        out.append(entry)
    return out
