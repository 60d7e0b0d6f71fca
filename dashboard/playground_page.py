"""Playground: one request to the service with a pruner and a decoder, side by side with the plain model.

Shows the answer as it streams, the timings, the kept visual tokens drawn over the image, the pruner's
token scores as a heatmap (when the pruner reports them) and, per generated token, the main vs contrast
probabilities (tokens the decoder changed are marked).
"""
from __future__ import annotations

from typing import Any, Iterator

import streamlit as st
from PIL import Image

from vlmguard.dashboard.request_inputs import (aspect_input, image_digest, image_input, method_inputs,
                                               selection_inputs, token_ids)
from vlmguard.dashboard.result_view import (answer_view, layers, spec_caption, step_probabilities,
                                            timing_metrics, token_views)
from vlmguard.dashboard.service import BASELINE_SPEC, ModelFacts, failure_message, spec_kwargs
from vlmguard.dashboard.ui import config, method_schemas, service_client, service_page
from vlmguard.errors import VlmguardError

RESULTS_KEY = "pg_results"
DEFAULT_PROMPT = "Is there a dog in the image? Answer the question using a single word or phrase."


def render() -> None:
    cfg = config()
    status = service_page(cfg, "Playground", "The playground")
    if status is None:
        return
    schemas = method_schemas()
    client = service_client(cfg)
    left, right = st.columns([1, 1])
    with left:
        model = st.selectbox("model", status.models, key="pg_model")
        image, objects = image_input("pg")
    with right:
        prompt = st.text_area("prompt", DEFAULT_PROMPT, key="pg_prompt", height=90)
        methods = method_inputs(schemas, "pg")
        max_new = st.slider("max new tokens", 1, 256, 16, key="pg_max_new")
        aspect = aspect_input("pg")
        with st.expander("token selection (both sides)"):
            selection, selection_ok = selection_inputs("pg", token_ids(client, model))
        compare = st.checkbox("side by side with the plain model (no pruning, greedy)", value=True, key="pg_compare")
        go = st.button("Generate", type="primary", key="pg_go",
                       disabled=image is None or not methods.ready or not selection_ok)
    if image is None:
        st.info("Pick a SynthCOCO sample or upload an image.")
        return
    spec = spec_kwargs(methods.pruning, methods.budget, methods.pruning_params, methods.decoding,
                       methods.decoding_params, max_new, selection=selection, image_aspect=aspect)
    facts = status.facts.get(model) or ModelFacts()
    inputs = _inputs(model, prompt, image, spec)
    if go:
        st.session_state[RESULTS_KEY] = {**_run(client, model, prompt, image, spec, compare, facts), "inputs": inputs}
    shown = st.session_state.get(RESULTS_KEY)
    if shown and not go:
        then = shown.get("inputs") or {}
        changed = [k for k, v in inputs.items() if then.get(k) != v]
        if changed:  # kept for comparison, but never shown as if they answered the current input
            was = f" (prompt then: “{_clip(then['prompt'])}”)" if "prompt" in changed and then.get("prompt") else ""
            what = " and ".join([", ".join(changed[:-1]), changed[-1]] if len(changed) > 1 else changed)
            st.warning(f"Stale results: the {what} changed since these were computed{was}. "
                       "Press Generate for the current input.")
        _show_all(shown, image_from=shown["image"], facts=shown["facts"])
    if objects:
        st.caption("Objects visible in this scene: " + ", ".join(objects))


def _inputs(model: str, prompt: str, image: Image.Image, spec: dict[str, Any]) -> dict[str, Any]:
    """What a result was computed for (the image by a digest of its pixels), to tell when results are stale."""
    return {"image": image_digest(image), "prompt": prompt, "model": model, "settings": spec}


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _run(client, model: str, prompt: str, image: Image.Image, spec: dict[str, Any], compare: bool,
         facts: ModelFacts) -> dict[str, Any] | None:
    """Run the request (streamed) and the plain baseline; draw as they arrive; return what to keep."""
    out: dict[str, Any] = {"image": image, "facts": facts, "results": {}, "errors": {}}
    runs = [("with methods", spec)]
    if compare:
        plain = {k: v for k, v in spec.items() if k not in ("budget", "pruning_params", "decoding_params")}
        runs.append(("plain model", {**plain, **BASELINE_SPEC}))
    cols = st.columns(len(runs))
    for col, (title, sp) in zip(cols, runs):
        with col:
            st.subheader(title)
            st.caption(spec_caption(sp))
            holder: dict[str, Any] = {}
            answer = st.empty()  # the text as it streams in, then the answer (a JSON one indented)
            try:
                with answer:
                    st.write_stream(_text_deltas(client.generate_stream(prompt, [image], model=model, **sp), holder))
            except VlmguardError as e:
                message = failure_message(e, getattr(client, "timeout", 300), "playground")
                st.error(message)
                out["errors"][title] = message
                continue
            result = holder.get("result")
            if result is None:
                st.error("the stream ended without a result")
                continue
            out["results"][title] = {"spec": sp, "result": result}
            with answer:
                answer_view(result.text, sp)
            _show_result(result, image, sp, facts)
    return out


def _text_deltas(events: Iterator[Any], holder: dict[str, Any]) -> Iterator[str]:
    for ev in events:
        if getattr(ev, "text", ""):
            yield ev.text
        if getattr(ev, "done", False):
            holder["result"] = ev.result
            return


def _show_all(shown: dict[str, Any], image_from: Image.Image, facts: ModelFacts) -> None:
    items = list(shown["results"].items()) + [(t, None) for t in shown["errors"]]
    cols = st.columns(max(1, len(items)))
    for col, (title, entry) in zip(cols, items):
        with col:
            st.subheader(title)
            if entry is None:
                st.error(shown["errors"][title])
                continue
            st.caption(spec_caption(entry["spec"]))
            answer_view(entry["result"].text, entry["spec"])
            _show_result(entry["result"], image_from, entry["spec"], facts)


def _show_result(r: Any, image: Image.Image, sp: dict[str, Any], facts: ModelFacts) -> None:
    timing_metrics(r.timings)
    cached = getattr(r.timings, "prefill_cached_tokens", 0)
    st.caption(f"finish: {r.finish_reason} · {len(r.token_ids)} tokens · visual tokens per LLM layer: "
               f"{layers(r.visual_tokens_kept)}"
               + (f" · {cached} prompt tokens from the prefix cache (this image was seen before)" if cached else ""))
    token_views(image, sp, facts, visual_tokens=r.visual_tokens, kept=r.kept_indices, pruning_report=r.pruning or {})
    step_probabilities(r.steps, r.logprobs, sp)


if __name__ == "__main__":
    render()
