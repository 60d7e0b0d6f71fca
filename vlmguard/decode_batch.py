"""The decode loop of one batch of requests, as an object the engine (or a server) steps token by token.

A :class:`DecodeBatch` is what the engine's prefill hands over: the decode state (KV cache, per-layer key
validity, next positions), the pending next-token logits of every row, the decoder that combines branch
logits, the sampler, and one :class:`LiveRequest` per request still generating. ``advance()`` picks every
request's next token from the pending logits, emits its text, lets finished requests leave the batch and
runs one decode forward for the rest (every branch row at once).

In-flight batching: ``absorb(other)`` merges another prefilled batch (the same pruner and *joinable* decoder;
each request keeps its own length, stop strings and token selection) into this one between two steps, so
requests that arrive while a batch decodes join it instead of waiting for it to finish. Rows come in one block
per cohort (below), in the order the cohorts joined; inside a block they are branch-major (row ``k * n + j`` of
the block is branch k of the cohort's request j), so cohorts
may have different branches (LQCD's count depends on its requests). The merged cache left-pads the
shorter side with masked slots (``LayerRunner.merge``), and every request keeps its own RoPE positions,
so a request's tokens are those it would get alone.

Each prefilled batch is a *cohort*: the decoder instance that was set up for its requests (with their
per-request state), its context and its own step count. After a merge the forward pass runs once for all
rows, and ``combine`` runs once per cohort on that cohort's rows (with ``ctx.active`` naming them and the
cohort's step index), so contrastive decoders join too; decoders whose combine is a plain function of the
logits (``Decoder.merged_combine``) get one call for all rows. Decoders whose forward hooks act per request
(``Decoder.row_hooks``: VISTA) are told around every decode forward which rows each cohort owns
(``decoding.base.forward_owners``), and a cohort whose requests have all left is torn down (its hooks
removed) at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from vlmguard.choices import restrict_to_choices
from vlmguard.decoding.base import (Combined, DecodeContext, Decoder, OwnedRows, StepInputs,
                                    forward_owners, values_on)
from vlmguard.detokenize import IncrementalText
from vlmguard.errors import non_finite_cause
from vlmguard.flops import result_flops
from vlmguard.guided import dead_end, new_matcher, restrict_to_guides
from vlmguard.penalties import apply_penalties, hold_eos, penalised
from vlmguard.prefix_cache import PrefixCache, PromptTokens
from vlmguard.results import GenerationResult, Request, StepDiagnostic, StreamEvent, Timings, TokenLogprob
from vlmguard.runner import DecodeState, LayerRunner
from vlmguard.sampling import RowSampler, select_tokens
from vlmguard.spec import GenerationSpec
from vlmguard.token_text import entry_log_softmax, logprob_entry, token_pieces


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """``text`` up to the first stop string it contains, and that stop string (None when there is none)."""
    hit = next((s for s in stops if s and s in text), None)
    return (text if hit is None else text[: text.index(hit)]), hit


def _stop_in_tail(detok: IncrementalText, stops: list[str]) -> str | None:
    """A stop string in the end of the text so far (the stable text's last characters, as long as the longest
    stop string, plus the text still held back): earlier text was searched at earlier tokens."""
    longest = max((len(s) for s in stops), default=0)
    if not longest:
        return None
    tail = detok.text[-(longest + len(detok.last)):] + detok.pending
    return next((s for s in stops if s and s in tail), None)


def _dropped_space(piece: str, alone: str) -> str:
    """The whitespace a token's text begins with inside a text (``piece``) that its decode alone (``alone``) drops
    (SentencePiece's leading space of a sequence's first token); "" where it keeps it or writes nothing."""
    space = piece[:len(piece) - len(piece.lstrip())]
    return "" if not alone or alone.startswith(space) else space


def _shown(lv: "LiveRequest", text: str) -> str:
    """What a request shows of its decoded text: stripped, or with ``spec.exact_text`` as its tokens write it (the
    first token's dropped space put back)."""
    return lv.lead + text if lv.spec.exact_text else text.strip()


def _hold_back(text: str, stops: list[str]) -> str:
    """``text`` without its longest ending that is the start of a stop string (streamed once it is not)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return text[:len(text) - held] if held else text


@dataclass(eq=False)
class Cohort:
    """Requests prefilled together: the decoder set up for them, its context, and their decode step."""

    decoder: Decoder
    dctx: DecodeContext
    branch_names: list[str] = field(default_factory=lambda: ["main"])  # its rows' branches, "main" first
    step: int = 0


@dataclass
class _Block:
    """One cohort's share of a step: its requests (a slice of ``DecodeBatch.lives``) and its rows, from
    ``first`` on, branch-major (row ``first + k * n + j`` is branch k of the block's request j)."""

    cohort: Cohort
    lives: slice
    first: int

    @property
    def n(self) -> int:
        return self.lives.stop - self.lives.start

    @property
    def n_rows(self) -> int:
        return self.n * len(self.cohort.branch_names)

    def rows(self, device) -> torch.Tensor:
        return torch.arange(self.first, self.first + self.n_rows, device=device)


@dataclass
class LiveRequest:
    """One request in the decode loop: what its result will report, and its progress."""

    index: int  # StreamEvent.index of this request
    local: int  # its index among the prompts its decoder was set up with (DecodeContext.active)
    request: Request
    t0: float  # when the engine started on it
    t_mark: float  # start of the step that produces its next token
    setup_s: float
    vision_s: float
    prefill_s: float
    prompt_len: int
    n_visual: int
    visual_fed: list[int]  # visual tokens fed to each layer
    kept: list[int] | None
    pruning: dict[str, Any]
    batch_size: int  # the most requests it decoded together with (itself included)
    prefill_batch: int  # the requests prefilled with it (itself included; copies of one request count each)
    sampler: RowSampler  # its token selection (its own seeded generator when it samples)
    cohort: Cohort  # the decoder (and context) that set it up: its combine and its report
    spec: GenerationSpec  # its own: length, stop strings, token selection, what its result reports
    prefill_tokens: int = 0  # Timings.prefill_tokens
    prefill_shared: int = 0  # Timings.prefill_shared_tokens
    prefill_cached: int = 0  # Timings.prefill_cached_tokens
    prompt_cached: int = 0  # Timings.prompt_cached_tokens
    # per branch (0: its own rows, k: the cohort's branch k) whose answer the prefix cache keeps when it ends
    # (``PrefixCache.store_answer``), that row's prompt as the first layer received it
    prompts: dict[int, PromptTokens] = field(default_factory=dict)
    gen: list[int] = field(default_factory=list)
    guide: Any = None  # its llguidance matcher, where its spec has a format (vlmguard/guided.py); made at its 1st step
    steps: list[StepDiagnostic] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0  # entries already sent with a stream event
    prompt_logprobs: list[TokenLogprob] | None = None  # its prompt's, when its spec asks (vlmguard/prompt_logprobs.py)
    events: int = 0  # the stream events it has had
    end_logprob: TokenLogprob | None = None  # GenerationResult.end_logprob
    sent_text: str = ""  # the text streamed so far
    detok: IncrementalText | None = None  # its generated text, decoded a token at a time
    final_text: str | None = None  # set when it finishes (stripped, or as ``spec.exact_text`` says)
    lead: str = ""  # with ``spec.exact_text``: the leading space its first token has and its decoded text drops
    per_tok: list[float] = field(default_factory=list)
    finish: str = "length"
    error: str | None = None  # why it ended early (finish "error")
    error_code: str | None = None  # GenerationResult.error_code
    ttft: float = 0.0
    decode_s: float = 0.0


class DecodeBatch:
    """A prefilled batch in the decode loop (see module doc). Not thread-safe: one caller steps it."""

    def __init__(self, *, runner: LayerRunner, tokenizer: Any, eos: set[int], spec: GenerationSpec,
                 cohort: Cohort, state: DecodeState,
                 logits: torch.Tensor, hidden: dict[int, torch.Tensor], lives: list[LiveRequest],
                 device: torch.device, prefix_cache: PrefixCache | None = None):
        self.runner, self.tok, self.eos, self.spec = runner, tokenizer, eos, spec
        # the decoder of the first cohort speaks for the spec (joinability, hidden layers, name)
        self.decoder = cohort.decoder
        self.state, self.logits, self.hidden = state, logits, hidden
        self.head: torch.Tensor | None = None  # the decoder's extra lm_head rows at the last step (main rows)
        self.lives = lives  # active requests, grouped by cohort in cohort order (the order of main rows)
        self.device = device
        self.prefix_cache = prefix_cache  # keeps each finished request's prompt and answer (LiveRequest.prompts)
        self.cohorts = [cohort]  # the cohorts with rows in the batch
        self._owned = [cohort]  # every cohort ever merged in: torn down by close()
        self._closed = False
        cohort.dctx.active = [lv.local for lv in lives]

    @property
    def active(self) -> int:
        return len(self.lives)

    @property
    def joinable(self) -> bool:
        return bool(getattr(self.decoder, "joinable", False))

    def _guides(self) -> list[Any]:
        """Each active request's format matcher (None: free), made at its first step."""
        for lv in self.lives:
            if lv.spec.guided is not None and lv.guide is None:
                lv.guide = new_matcher(self.tok, self.runner.adapter.logits_width, sorted(self.eos), lv.spec.guided)
        return [lv.guide for lv in self.lives]

    # ---- one step -----------------------------------------------------------------------------
    def advance(self) -> Iterator[StreamEvent]:
        """Select every active request's next token, emit events, drop finished requests, then run one
        decode forward for the others (whose next logits become pending)."""
        if not self.lives:
            return
        tok, na = self.tok, len(self.lives)
        blocks = self._blocks()
        penalties = any(penalised(lv.spec) for lv in self.lives)  # repeated tokens, each request by its own settings
        if penalties and not self.decoder.penalises_combined:
            self.logits = self._penalised_logits(blocks)
        combined = self._combine(blocks)
        plain = combined.main_logprobs if combined.fallback_logprobs is None else combined.fallback_logprobs
        gens, specs = [lv.gen for lv in self.lives], [lv.spec for lv in self.lives]
        combined.scores = hold_eos(combined.scores, gens, specs, self.eos, fallback=plain)
        combined.scores = restrict_to_choices(combined.scores, gens, specs, tok, self.eos, fallback=plain)
        combined.scores, stuck = restrict_to_guides(combined.scores, self._guides(), sorted(self.eos), fallback=plain)
        tokens = select_tokens(combined.scores, [lv.sampler for lv in self.lives])
        # a row whose scores are NaN (a float16 model overflowing mid-answer) has no token to give: that request
        # ends with an error, the others go on
        columns = [tokens, torch.isnan(combined.scores).any(dim=-1)]
        diagnostics = any(lv.spec.diagnostics for lv in self.lives)
        if diagnostics:  # (a vocabulary-wide argmax per step, only when asked for)
            idx = tokens[:, None]
            columns += [(combined.main_logprobs if penalties and self.decoder.penalises_combined
                         else self.logits[self._main_rows(blocks)]).argmax(dim=-1),
                        combined.main_logprobs.gather(1, idx).exp().squeeze(1),
                        combined.scores.gather(1, idx).squeeze(1)]
            if combined.contrast_logprobs is not None:
                columns.append(combined.contrast_logprobs.gather(1, idx).exp().squeeze(1))
        # all the host reads of this step in one device sync (float64 holds every value exactly, token ids too);
        # on a GPU it waits for the combine and the sampler: the token's time covers them
        read = torch.stack([c.to(torch.float64) for c in columns]).tolist()
        tok_list, broken_list = [int(t) for t in read[0]], read[1]
        if diagnostics:
            main_top, mp, sc = [int(t) for t in read[2]], read[3], read[4]
            cp = read[5] if len(read) > 5 else [None] * na
        now = time.perf_counter()
        logprobs = self._logprobs(combined.scores, tokens, tok_list)
        finished_rows: list[int] = []
        for j, lv in enumerate(self.lives):
            t = tok_list[j]
            dt = now - lv.t_mark
            if not lv.per_tok:
                lv.ttft = now - lv.t0
            lv.per_tok.append(dt)
            if broken_list[j]:
                lv.finish, lv.error_code = "error", "NonFiniteLogits"
                lv.error = (f"the scores became NaN at generated token {len(lv.gen)} "
                            + non_finite_cause(self.runner.adapter.model.dtype))
                finished_rows.append(j)
                continue
            why = stuck.get(j)  # a format the vocabulary cannot go on with (it held only the end of sequence)
            if why is None and lv.guide is not None and t not in self.eos and not lv.guide.consume_token(t):
                why = dead_end(lv.guide)  # (a token its mask allowed that the matcher refused: not expected)
            if why:
                lv.finish, lv.error_code = "error", "FormatDeadEnd"
                lv.error = f"at generated token {len(lv.gen)}: {why}"
                finished_rows.append(j)
                continue
            if t in self.eos or t in lv.spec.stop_token_ids:
                lv.finish, lv.end_logprob = "stop", logprobs[j]
                finished_rows.append(j)
                continue
            lv.gen.append(t)
            if logprobs[j] is not None:
                lv.logprobs.append(logprobs[j])
            if lv.spec.diagnostics:
                lv.steps.append(StepDiagnostic(token_id=t, token=tok.convert_ids_to_tokens(t), main_prob=mp[j],
                                               contrast_prob=cp[j], score=sc[j], main_top_id=main_top[j]))
            if lv.detok is None:
                lv.detok = IncrementalText(tok)
                if lv.spec.exact_text:
                    lv.lead = _dropped_space(token_pieces(tok).text(t), tok.decode([t], skip_special_tokens=True))
            lv.detok.push(t)  # O(1) per token: a short window is decoded, not the whole text
            if _stop_in_tail(lv.detok, lv.spec.stop) is not None:
                lv.finish = "stop"
            if lv.finish == "stop" or len(lv.gen) >= lv.spec.max_new_tokens:
                finished_rows.append(j)
                text = self._final_text(lv)  # one full decode, cut at the stop string
            else:  # what is printable and cannot turn out to be the start of a stop string
                # whitespace at either end waits: the result's text is stripped, and the streamed pieces add
                # up to it (trailing whitespace is sent once more text follows it); with ``exact_text`` nothing is
                # stripped and nothing waits
                text = _shown(lv, _hold_back(lv.detok.text, lv.spec.stop))
            delta = text[len(lv.sent_text):] if text.startswith(lv.sent_text) else ""
            if delta:
                lv.sent_text += delta
                yield self._event(lv, t, delta)
        for j in finished_rows:
            lv = self.lives[j]
            result = self._result(lv, now)
            final = self._final_text(lv)  # an end of sequence flushes what was held back for the stop strings
            rest = final[len(lv.sent_text):] if final.startswith(lv.sent_text) else ""
            if rest:
                lv.sent_text += rest
                yield self._event(lv, None, rest)
            yield self._event(lv, None, "", result)
        if self.prefix_cache is not None:
            self._keep_answers(finished_rows, blocks)
        gone = set(finished_rows)
        keep_j = [j for j in range(na) if j not in gone]
        if not keep_j:
            self.lives = []
            return
        if finished_rows:
            self._select_rows(keep_j)
            tokens = tokens[keep_j]
            blocks = self._blocks()
        # every row of a block decodes its request's token (branch rows follow their main row)
        row_tokens = torch.cat([tokens[b.lives].repeat(len(b.cohort.branch_names)) for b in blocks])
        t_dec = time.perf_counter()
        # (most decoders ask for no hidden states: no row index to build then)
        main_rows = self._main_rows(blocks) if self.decoder.hidden_layers else None

        picked: dict[int, torch.Tensor] = {}

        def head_input(hid: dict[int, torch.Tensor]) -> torch.Tensor | None:
            picked.update({k: v[main_rows] for k, v in hid.items()})
            return self.decoder.head_input(picked)  # one decoder's params speak for every cohort's

        with forward_owners(self._owners(blocks)) if self.decoder.row_hooks else contextlib.nullcontext():
            logits, hid, self.head = self.runner.decode_step(
                row_tokens, self.state, hidden_layers=self.decoder.hidden_layers,
                head_input=head_input if main_rows is not None else None)
        self.logits = logits
        self.hidden = {} if main_rows is None else (picked or {k: v[main_rows] for k, v in hid.items()})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dec = time.perf_counter() - t_dec
        for lv in self.lives:  # a token's time = its decode forward + combine + token selection
            lv.decode_s += dec
            lv.t_mark = t_dec
        for c in self.cohorts:
            c.step += 1

    def _penalised_logits(self, blocks: list[_Block]) -> torch.Tensor:
        """The pending logits with each request's repetition penalties applied to all of its rows (main and
        branches), as transformers and vLLM apply them to a model's logits, before the decoder combines them."""
        gens, specs = [], []
        for b in blocks:
            lives = self.lives[b.lives]
            for _ in b.cohort.branch_names:  # branch-major: every branch's rows follow the block's requests
                gens += [lv.gen for lv in lives]
                specs += [lv.spec for lv in lives]
        return apply_penalties(self.logits, gens, specs)

    def _logprobs(self, scores: torch.Tensor, tokens: torch.Tensor, ids: list[int]) -> list[TokenLogprob | None]:
        """Each request's entry for the token it just drew (``tokens``, read as ``ids``; None where its spec asks
        for none): log-softmax of the decoder's final scores, the token's own and the ``logprobs`` most likely."""
        ks = [lv.spec.logprobs for lv in self.lives]
        if all(k is None for k in ks):
            return [None] * len(ks)
        lp = entry_log_softmax(scores)
        k_max = min(max(k for k in ks if k is not None), lp.shape[-1])
        top_v, top_i = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long())
        # one device sync for all three (float64 holds the float32 log-probabilities and the token ids exactly)
        read = torch.cat([t.to(torch.float64) for t in (lp.gather(1, tokens[:, None]), top_v, top_i)], dim=1).tolist()
        own = [r[0] for r in read]
        top_v = [r[1:1 + k_max] for r in read]
        top_i = [[int(i) for i in r[1 + k_max:]] for r in read]
        pieces = token_pieces(self.tok)
        return [None if k is None else logprob_entry(pieces, ids[j], own[j], top_i[j][:k], top_v[j][:k])
                for j, k in enumerate(ks)]

    def _keep_answers(self, finished: list[int], blocks: list[_Block]) -> None:
        """The prompt and answer of each finished request that keeps them (``LiveRequest.prompts``) into the prefix
        cache, from its rows of the batch's cache before they leave (its main row, and those of the decoder's
        branches that ask for it, ``Branch.cache``; every row was fed the same tokens): the tokens it fed, all it
        chose but the last (an end of sequence, or one that stopped it, was never fed)."""
        for j in finished:
            lv = self.lives[j]
            if not lv.prompts or lv.finish == "error" or len(lv.per_tok) < 2:
                continue
            block = next(b for b in blocks if b.lives.start <= j < b.lives.stop)
            for k, prompt in lv.prompts.items():  # branch k of the block's request j: row first + k * n + j
                self.prefix_cache.store_answer(prompt, lv.gen[:len(lv.per_tok) - 1], self.runner.adapter,
                                               self.state.cache, self.state.layer_valid,
                                               block.first + k * block.n + j - block.lives.start)

    @staticmethod
    def _unsent_logprobs(lv: LiveRequest) -> list[TokenLogprob]:
        out = lv.logprobs[lv.logprobs_sent:]
        lv.logprobs_sent = len(lv.logprobs)
        return out

    def _event(self, lv: LiveRequest, token_id: int | None, text: str, result: GenerationResult | None = None
               ) -> StreamEvent:
        """The request's next event: its text since the last, the log-probability entries not sent yet, the prompt's
        on its first event, and its result when it is done."""
        event = StreamEvent(index=lv.index, token_id=token_id, text=text, done=result is not None, result=result,
                            logprobs=self._unsent_logprobs(lv),
                            prompt_logprobs=None if lv.events else lv.prompt_logprobs)
        lv.events += 1
        return event

    def _blocks(self) -> list[_Block]:
        """Each cohort's requests (contiguous in ``lives``, which is grouped by cohort) and rows."""
        blocks, start, row = [], 0, 0
        for c in self.cohorts:
            n = sum(1 for lv in self.lives if lv.cohort is c)
            if n:
                blocks.append(_Block(c, slice(start, start + n), row))
                start, row = start + n, row + blocks[-1].n_rows
        return blocks

    def _main_rows(self, blocks: list[_Block]) -> torch.Tensor:
        """The main row of every request, in ``lives`` order."""
        return torch.cat([torch.arange(b.first, b.first + b.n, device=self.device) for b in blocks])

    def _owners(self, blocks: list[_Block]) -> dict[int, OwnedRows]:
        """Which rows of the next decode forward belong to which cohort (for decoders' row hooks)."""
        owners = {}
        for b in blocks:
            locals_ = [lv.local for lv in self.lives[b.lives]] * len(b.cohort.branch_names)
            rows = None if len(blocks) == 1 else b.rows(self.device)  # one cohort: every row, in order
            requests = values_on(tuple(locals_), torch.long, self.device)  # cached: no copy to the GPU per step
            owners[id(b.cohort.dctx)] = OwnedRows(rows=rows, requests=requests)
        return owners

    def _combine(self, blocks: list[_Block]) -> Combined:
        """The decoder's scores for every request: one call, or one per cohort on its own rows (see module
        doc); rows of the result follow ``lives``."""
        if self.decoder.merged_combine and all(b.n_rows == b.n for b in blocks):  # main rows only: one call
            blocks = [_Block(blocks[0].cohort, slice(0, len(self.lives)), 0)]
        parts = []
        for b in blocks:
            c, n = b.cohort, b.n
            logits = self.logits[b.first:b.first + b.n_rows]
            per_branch = {name: logits[k * n:(k + 1) * n] for k, name in enumerate(c.branch_names)}
            lives = self.lives[b.lives]
            c.dctx.active = [lv.local for lv in lives]
            parts.append(c.decoder.combine(StepInputs(logits=per_branch,
                                                      hidden={k: v[b.lives] for k, v in self.hidden.items()},
                                                      step=c.step,
                                                      head=None if self.head is None else self.head[b.lives],
                                                      penalise=_penaliser(c.decoder, lives))))
        if len(parts) == 1:
            return parts[0]

        def stitch(name: str) -> torch.Tensor | None:
            got = [getattr(p, name) for p in parts]
            return None if any(g is None for g in got) else torch.cat(got)

        return Combined(scores=stitch("scores"), main_logprobs=stitch("main_logprobs"),
                        contrast_logprobs=stitch("contrast_logprobs"),
                        fallback_logprobs=torch.cat([p.main_logprobs if p.fallback_logprobs is None
                                                     else p.fallback_logprobs for p in parts]))

    def finish(self, before_step: Callable[["DecodeBatch"], Any] | None = None) -> dict[int, GenerationResult]:
        """Advance until no request is active; the results by ``StreamEvent.index`` (a dropped request has none).
        ``before_step(self)`` runs before each step (e.g. to ``drop`` requests whose callers left)."""
        results: dict[int, GenerationResult] = {}
        while True:
            if before_step is not None:
                before_step(self)
            if not self.active:
                return results
            for ev in self.advance():
                if ev.done:
                    results[ev.index] = ev.result

    def drop(self, indices: set[int]) -> None:
        """Stop generating for the requests with these ``StreamEvent`` indices (their callers left)."""
        keep_j = [j for j, lv in enumerate(self.lives) if lv.index not in indices]
        if len(keep_j) < len(self.lives):
            if keep_j:
                self._select_rows(keep_j)
            else:
                self.lives = []

    def _select_rows(self, keep_j: list[int]) -> None:
        """Keep the requests at positions ``keep_j`` of ``lives`` (and their branch rows)."""
        keep = set(keep_j)
        rows = []
        for b in self._blocks():
            kept = [j - b.lives.start for j in range(b.lives.start, b.lives.stop) if j in keep]
            rows += [b.first + k * b.n + j for k in range(len(b.cohort.branch_names)) for j in kept]
        self.runner.reorder(self.state, rows)
        rows = torch.tensor(rows, device=self.device)
        self.logits = self.logits[rows]
        self.hidden = {k: v[keep_j] for k, v in self.hidden.items()}
        self.head = None if self.head is None else self.head[keep_j]
        self.lives = [self.lives[j] for j in keep_j]
        for c in self.cohorts:
            c.dctx.active = [lv.local for lv in self.lives if lv.cohort is c]
        live = {id(lv.cohort) for lv in self.lives}
        for c in self.cohorts:  # a cohort whose requests all left: its hooks go now, not at close()
            if id(c) not in live and c in self._owned:
                self._owned.remove(c)
                c.decoder.teardown(c.dctx)
        self.cohorts = [c for c in self.cohorts if id(c) in live]

    def _final_text(self, lv: LiveRequest) -> str:
        """The request's whole text, cut at the first stop string and stripped: the result's text, which the
        streamed pieces add up to (decoded once, when it finishes)."""
        if lv.final_text is None:
            cut, _ = _cut_at_stop(self.tok.decode(lv.gen, skip_special_tokens=True), lv.spec.stop)
            lv.final_text = _shown(lv, cut)
        return lv.final_text

    def _result(self, lv: LiveRequest, now: float) -> GenerationResult:
        final_text = self._final_text(lv)
        decoder, dctx = lv.cohort.decoder, lv.cohort.dctx
        last = lv.per_tok[-1] if lv.per_tok else 0.0
        result = GenerationResult(
            text=final_text, token_ids=lv.gen, finish_reason=lv.finish, prompt_tokens=lv.prompt_len,
            visual_tokens=lv.n_visual, visual_tokens_kept=lv.visual_fed, kept_indices=lv.kept,
            timings=Timings(vision_s=lv.vision_s, prefill_s=lv.prefill_s, decode_s=lv.decode_s + last,
                            ttft_s=lv.ttft, total_s=time.perf_counter() - lv.t0, per_token_s=lv.per_tok,
                            setup_s=lv.setup_s, batch_size=lv.batch_size,
                            prefill_batch=lv.prefill_batch, prefill_tokens=lv.prefill_tokens,
                            prefill_shared_tokens=lv.prefill_shared, prefill_cached_tokens=lv.prefill_cached,
                            prompt_cached_tokens=lv.prompt_cached),
            steps=lv.steps, pruning=lv.pruning,
            # the decoder, its per-request values, and whether this request's tokens were drawn (its own setting)
            decoding={**decoder.describe(), **dctx.request_report(lv.local), "sampled": lv.spec.sampling},
            request_id=lv.request.request_id, logprobs=lv.logprobs if lv.spec.logprobs is not None else None,
            prompt_logprobs=lv.prompt_logprobs, end_logprob=lv.end_logprob,
            error=lv.error, error_code=lv.error_code)
        result.prefill_flops = result_flops(self.runner.adapter.config, result).to_dict()
        return result

    def expand(self, source: list[int], requests: list[Request], specs: list[GenerationSpec],
               indices: list[int]) -> None:
        """Request ``i`` becomes a copy of the prefilled request at position ``source[i]`` (the same prompt and
        images, prefilled once: ``Engine.start_batch``), with its own request, spec, sampler and stream index.
        Only for a fresh batch of one cohort whose decoder has no branches and no per-request state."""
        if len(self.cohorts) != 1 or self.cohorts[0].branch_names != ["main"] or any(lv.gen for lv in self.lives):
            raise ValueError("only a fresh batch of a decoder without branches can be expanded")
        self.runner.reorder(self.state, list(source))
        rows = torch.tensor(source, device=self.device)
        self.logits = self.logits[rows]
        self.hidden = {k: v[rows] for k, v in self.hidden.items()}
        self.head = None if self.head is None else self.head[rows]
        base, n = self.lives, len(source)
        self.lives = [dataclasses.replace(
            base[s], index=indices[i], request=requests[i], spec=specs[i], sampler=RowSampler.for_spec(specs[i]),
            batch_size=n, prefill_batch=n, visual_fed=list(base[s].visual_fed),
            kept=None if base[s].kept is None else list(base[s].kept),
            pruning=dict(base[s].pruning), gen=[], guide=None, steps=[], logprobs=[], per_tok=[])
            for i, s in enumerate(source)]
        self.cohorts[0].dctx.active = [lv.local for lv in self.lives]
        self.spec = specs[0]

    # ---- in-flight batching -------------------------------------------------------------------
    def absorb(self, other: "DecodeBatch") -> None:
        """Merge ``other`` (prefilled with the same pruner and decoder: ``GenerationSpec.batch_key``) into this
        batch; ``other`` is empty afterwards.

        Both batches must hold pending logits (neither is mid-step). Only joinable decoders (see
        ``Decoder.joinable``) can merge; ``other``'s cohorts keep their decoders and step counts."""
        if other is self or not other.lives:
            return
        if not (self.joinable and other.joinable):
            raise ValueError(f"decoder {self.decoder.name} cannot merge batches (not joinable)")
        if other.spec.batch_key() != self.spec.batch_key():
            raise ValueError("only batches of one pruner and decoder (GenerationSpec.batch_key) can merge")
        if not self.lives:
            raise ValueError("cannot absorb into a finished batch")
        # other's cohorts become the last blocks: its rows simply follow ours
        self.state = self.runner.merge(self.state, other.state)
        self.logits = torch.cat([self.logits, other.logits.to(self.logits.dtype)])
        self.hidden = {k: torch.cat([v, other.hidden[k]]) for k, v in self.hidden.items()}
        self.head = None  # a fresh prefill has none: combine computes it from the hidden states this once
        self.lives = self.lives + other.lives
        for lv in self.lives:
            lv.batch_size = max(lv.batch_size, len(self.lives))
        self.cohorts += [c for c in other.cohorts if c not in self.cohorts]
        self._owned += [c for c in other._owned if c not in self._owned]
        other.lives, other._owned, other._closed = [], [], True  # its cohorts are ours now

    def close(self) -> None:
        """Tear every cohort's decoder down (hooks); idempotent."""
        if not self._closed:
            self._closed = True
            for c in self._owned:
                c.decoder.teardown(c.dctx)


def _penaliser(decoder: Any, lives: list[LiveRequest]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``StepInputs.penalise`` for these requests: only for a decoder that penalises its own mixture, and only
    when one of them sets a penalty."""
    if not decoder.penalises_combined or not any(penalised(lv.spec) for lv in lives):
        return None
    gens, specs = [lv.gen for lv in lives], [lv.spec for lv in lives]
    return lambda logits: apply_penalties(logits, gens, specs)
