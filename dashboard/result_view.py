"""How a page shows an answer's facts, shared by the Playground and the Chat: its settings in one line, its
timings, the kept visual tokens over the image, the pruner's scores, and per generated token the main vs
contrast probabilities."""
from __future__ import annotations

import json
from typing import Any, Sequence

import streamlit as st
from PIL import Image

from vlmguard.dashboard import drawing
from vlmguard.dashboard.service import ModelFacts


def spec_caption(sp: dict[str, Any]) -> str:
    """A request's settings (``spec_kwargs``'s fields) in one line."""
    pr = sp.get("pruning", "none")
    if pr != "none":
        pr += f" @ {sp.get('budget')}"
    extra = []
    for k in ("pruning_params", "decoding_params"):
        if sp.get(k):
            extra.append(", ".join(f"{a}={b}" for a, b in sp[k].items()))
    if sp.get("image_aspect"):
        extra.append(f"images: {sp['image_aspect']}")
    if sp.get("do_sample"):
        extra.append(f"sampling T={sp.get('temperature')} seed {sp.get('seed')}"
                     + "".join(f" {name} {sp[k]}" for k, name in (("top_p", "top-p"), ("min_p", "min-p")) if k in sp))
    extra += [f"{k.removesuffix('_penalty')} penalty {sp[k]}" for k in ("presence_penalty", "frequency_penalty",
                                                                       "repetition_penalty") if k in sp]
    if sp.get("logit_bias"):
        extra.append("token bias " + ", ".join(f"{t}: {b:+g}" for t, b in sp["logit_bias"].items()))
    if sp.get("choices"):
        extra.append("answer one of: " + " / ".join(sp["choices"]))
    if sp.get("guided"):
        g = sp["guided"]
        kind = next(k for k in ("json_schema", "json_object", "regex", "grammar") if g.get(k) not in (None, False))
        shown = {"json_schema": "JSON schema", "json_object": "any JSON object"}.get(kind, f"{kind} `{g.get(kind)}`")
        extra.append(f"answer format: {shown}" + (" (compact)" if g.get("whitespace") == "compact" else ""))
    return f"pruner `{pr}` · decoder `{sp.get('decoding', 'greedy')}`" + (f" · {'; '.join(extra)}" if extra else "")


def answer_view(text: str, sp: dict[str, Any]) -> None:
    """An answer: a JSON one (its request asked for JSON) as indented JSON, the rest as markdown."""
    guided = sp.get("guided") or {}
    if text and (guided.get("json_schema") is not None or guided.get("json_object")):
        try:
            st.code(json.dumps(json.loads(text), indent=2, ensure_ascii=False), language="json")
            return
        except ValueError:  # an answer cut by max_tokens before its JSON was complete
            pass
    st.markdown(text or "_(empty answer)_")


def timing_metrics(t: Any) -> None:
    """Prefill, first token, decode and total, as four metrics."""
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("prefill", ms(t.prefill_s))
    c2.metric("first token", ms(t.ttft_s))
    c3.metric("decode", ms(t.decode_s))
    c4.metric("total", ms(t.total_s))


def token_views(image: Image.Image, sp: dict[str, Any], facts: ModelFacts, *, visual_tokens: int,
                kept: Sequence[int] | None, pruning_report: dict[str, Any] | None) -> None:
    """The kept visual tokens over the image the model saw, and beside them the pruner's token scores (where its
    report has them; ``pruning_report`` None: the answer carries no report, so nothing is said of one)."""
    if not visual_tokens:
        return
    family, grid_side = facts.family, facts.grid_side
    image = drawing.model_view(image, family, sp.get("image_aspect"), facts.reference_aspect)
    n_kept = len(kept) if kept is not None else visual_tokens
    i1, i2 = st.columns(2)
    with i1:
        st.image(drawing.kept_overlay(image, kept, visual_tokens, family, grid_side=grid_side),
                 caption=f"kept visual tokens: {n_kept} of {visual_tokens}", width="stretch")
    if pruning_report is None:
        return
    with i2:
        found = drawing.find_visual_scores(pruning_report, visual_tokens)
        if found is not None:
            key, scores = found
            st.image(drawing.score_heatmap(image, scores, family, grid_side=grid_side),
                     caption=f"token scores ({key}): brighter = higher", width="stretch")
        else:
            st.caption(f"The pruner `{pruning_report.get('name', 'none')}` reports no per-token scores.")


def step_probabilities(steps: Sequence[Any] | None, logprobs: Sequence[Any] | None, sp: dict[str, Any]) -> None:
    """Per generated token: the main vs contrast branch's probability (a chart), the tokens the decoder changed,
    and a table with the final distribution's alternatives (from ``logprobs``)."""
    frame = drawing.steps_frame(steps or [], logprobs)
    if frame.empty:
        return
    changed = frame[frame["changed"]]
    picks = ", ".join(f"`{x}`" for x in changed["label"])
    st.markdown("**Per-token probabilities** (main vs contrast branch)"
                + (f" · {changed_by(sp)} changed {len(changed)} token(s): {picks}"
                   if len(changed) else " · the decoder kept the main branch's choice everywhere"))
    st.altair_chart(drawing.probs_chart(frame), width="stretch")
    with st.expander("steps (final_prob and alternatives: the decoder's final distribution)"):
        st.dataframe(frame.drop(columns=["label"]), hide_index=True)


def changed_by(sp: dict[str, Any]) -> str:
    """Who picked a token other than the main branch's most likely: with sampling on, a draw does that too."""
    if not sp.get("do_sample"):
        return "the decoder"
    return "sampling" if sp.get("decoding", "greedy") in ("greedy", "sample") else "sampling or the decoder"


def ms(seconds: float) -> str:
    milli = 1000.0 * seconds
    if milli >= 1000:
        return f"{seconds:.2f} s"
    return f"{milli:.0f} ms" if milli >= 100 else f"{milli:.1f} ms"


def layers(kept: list[int]) -> str:
    """Visual tokens per LLM layer, as runs: ``144 → 16 (4 layers)``."""
    if not kept:
        return "-"
    if len(set(kept)) == 1:
        return f"{kept[0]} at all {len(kept)} layers"
    return " → ".join(f"{v}" for i, v in enumerate(kept) if i == 0 or kept[i - 1] != v) + f" ({len(kept)} layers)"
