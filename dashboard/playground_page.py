"""Playground: one request to the service with a pruner and a decoder, side by side with the plain model.

Shows the answer as it streams, the timings, the kept visual tokens drawn over the image, the pruner's
token scores as a heatmap (when the pruner reports them) and, per generated token, the main vs contrast
probabilities (tokens the decoder changed are marked).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import streamlit as st
from PIL import Image

from vlmguard.client import APITimeoutError
from vlmguard.dashboard import drawing, images
from vlmguard.dashboard.service import BASELINE_SPEC, ModelFacts, selection_kwargs, spec_kwargs
from vlmguard.dashboard.ui import config, method_schemas, params_form, service_client, service_notice, service_status
from vlmguard.errors import VlmguardError
from vlmguard.spec import IMAGE_ASPECTS, parse_budget

RESULTS_KEY = "pg_results"
DEFAULT_PROMPT = "Is there a dog in the image? Answer the question using a single word or phrase."


def render() -> None:
    cfg = config()
    st.title("Playground")
    status = service_status(cfg)
    if not status.ok:
        service_notice(status, "The playground")
        return
    st.caption(f"Service: `{status.url}` · models: {', '.join(status.models)}")
    schemas = method_schemas()
    left, right = st.columns([1, 1])
    with left:
        model = st.selectbox("model", status.models, key="pg_model")
        image, objects = _image_input()
    with right:
        prompt = st.text_area("prompt", DEFAULT_PROMPT, key="pg_prompt", height=90)
        c1, c2 = st.columns(2)
        with c1:
            pruners = list(schemas["pruning"])
            pruning = st.selectbox("pruner", pruners, index=_index(pruners, "fastv"), key="pg_pruning")
            budget = _budget_input(pruning)
            with st.expander("pruner parameters"):
                pruning_params = params_form(schemas["pruning"][pruning], f"pg_pp_{pruning}")
        with c2:
            decoders = list(schemas["decoding"])
            decoding = st.selectbox("decoder", decoders, index=_index(decoders, "vcd"), key="pg_decoding")
            with st.expander("decoder parameters"):
                decoding_params = params_form(schemas["decoding"][decoding], f"pg_dp_{decoding}")
        max_new = st.slider("max new tokens", 1, 256, 16, key="pg_max_new")
        aspect = st.selectbox("image preprocessing", IMAGE_ASPECTS, key="pg_image_aspect",
                              help="native: the checkpoint's processor (LLaVA-1.5 crops the centre square); pad: "
                              "padded to a square first, as LLaVA-1.5 was trained; reference: the family's own")
        with st.expander("token selection (both sides)"):
            selection = _selection_inputs()
        compare = st.checkbox("side by side with the plain model (no pruning, greedy)", value=True, key="pg_compare")
        budget_ok = pruning == "none" or budget is not None
        go = st.button("Generate", type="primary", key="pg_go", disabled=image is None or not budget_ok)
    if image is None:
        st.info("Pick a SynthCOCO sample or upload an image.")
        return
    spec = spec_kwargs(pruning, budget, pruning_params, decoding, decoding_params, max_new, selection=selection,
                       image_aspect=aspect)
    facts = status.facts.get(model) or ModelFacts()
    client = service_client(cfg)
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
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    return {"image": (image.size, image.mode, digest), "prompt": prompt, "model": model, "settings": spec}


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _selection_inputs() -> dict[str, Any]:
    s1, s2 = st.columns(2)
    with s1:
        temperature = st.slider("temperature (0 = greedy)", 0.0, 2.0, 0.0, 0.05, key="pg_temperature")
        seed = int(st.number_input("sampling seed", min_value=0, value=0, step=1, key="pg_sample_seed"))
        repetition = st.slider("repetition penalty (1 = off)", 0.5, 2.0, 1.0, 0.05, key="pg_repetition")
    with s2:
        presence = st.slider("presence penalty", -2.0, 2.0, 0.0, 0.1, key="pg_presence")
        frequency = st.slider("frequency penalty", -2.0, 2.0, 0.0, 0.1, key="pg_frequency")
    return selection_kwargs(temperature, seed, presence, frequency, repetition)


def _index(options: list[str], preferred: str) -> int:
    return options.index(preferred) if preferred in options else 0


def _budget_input(pruning: str) -> int | float | None:
    if pruning == "none":
        return None
    text = st.text_input("budget: visual tokens kept (e.g. 36) or kept fraction (e.g. 0.25)", "0.25", key="pg_budget")
    try:
        return parse_budget(text)
    except ValueError as e:
        st.error(str(e))
        return None


def _image_input() -> tuple[Image.Image | None, list[str]]:
    names = images.synth_sample_names()
    sources = (["SynthCOCO test image"] if names else []) + ["render a SynthCOCO scene", "upload an image"]
    src = st.radio("image", sources, key="pg_source", horizontal=True)
    objects: list[str] = []
    image = None
    if src == "SynthCOCO test image":
        name = st.selectbox("sample", names, key="pg_sample")
        image = images.load_synth_sample(name)
    elif src == "render a SynthCOCO scene":
        seed = int(st.number_input("scene seed", min_value=0, value=1, step=1, key="pg_seed"))
        image, objects = images.render_synth_scene(seed)
    else:
        up = st.file_uploader("image file", type=["png", "jpg", "jpeg", "webp", "bmp"], key="pg_upload")
        if up is not None:
            try:
                image = images.load_upload(up.getvalue())
            except VlmguardError as e:
                st.error(str(e))
    if image is not None:
        st.image(drawing.display_image(image, 256), caption=f"input ({image.size[0]}x{image.size[1]})")
    return image, objects


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
            st.caption(_spec_caption(sp))
            holder: dict[str, Any] = {}
            try:
                st.write_stream(_text_deltas(client.generate_stream(prompt, [image], model=model, **sp), holder))
            except VlmguardError as e:
                message = getattr(e, "message", None) or str(e)
                if isinstance(e, APITimeoutError):  # the client's own advice (a larger timeout=) is not the user's
                    message = (f"the service sent nothing for {getattr(client, 'timeout', 300):g} s (the playground's "
                               "limit): ask for fewer new tokens, or see whether the service is overloaded "
                               "(its /metrics)")
                st.error(message)
                out["errors"][title] = message
                continue
            result = holder.get("result")
            if result is None:
                st.error("the stream ended without a result")
                continue
            out["results"][title] = {"spec": sp, "result": result}
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
            st.caption(_spec_caption(entry["spec"]))
            st.markdown(entry["result"].text or "_(empty answer)_")
            _show_result(entry["result"], image_from, entry["spec"], facts)


def _spec_caption(sp: dict[str, Any]) -> str:
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
        extra.append(f"sampling T={sp.get('temperature')} seed {sp.get('seed')}")
    extra += [f"{k.removesuffix('_penalty')} penalty {sp[k]}" for k in ("presence_penalty", "frequency_penalty",
                                                                       "repetition_penalty") if k in sp]
    return f"pruner `{pr}` · decoder `{sp.get('decoding', 'greedy')}`" + (f" · {'; '.join(extra)}" if extra else "")


def _show_result(r: Any, image: Image.Image, sp: dict[str, Any], facts: ModelFacts) -> None:
    t = r.timings
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("prefill", _ms(t.prefill_s))
    c2.metric("first token", _ms(t.ttft_s))
    c3.metric("decode", _ms(t.decode_s))
    c4.metric("total", _ms(t.total_s))
    n = r.visual_tokens
    kept = r.kept_indices
    family, grid_side = facts.family, facts.grid_side
    image = drawing.model_view(image, family, sp.get("image_aspect"), facts.reference_aspect)
    n_kept = len(kept) if kept is not None else n
    cached = getattr(t, "prefill_cached_tokens", 0)
    st.caption(f"finish: {r.finish_reason} · {len(r.token_ids)} tokens · visual tokens per LLM layer: "
               f"{_layers(r.visual_tokens_kept)}"
               + (f" · {cached} prompt tokens from the prefix cache (this image was seen before)" if cached else ""))
    if n:
        i1, i2 = st.columns(2)
        with i1:
            st.image(drawing.kept_overlay(image, kept, n, family, grid_side=grid_side),
                     caption=f"kept visual tokens: {n_kept} of {n}", width="stretch")
        with i2:
            found = drawing.find_visual_scores(r.pruning, n)
            if found is not None:
                key, scores = found
                st.image(drawing.score_heatmap(image, scores, family, grid_side=grid_side),
                         caption=f"token scores ({key}): brighter = higher", width="stretch")
            else:
                st.caption(f"The pruner `{(r.pruning or {}).get('name', 'none')}` reports no per-token scores.")
    frame = drawing.steps_frame(r.steps, r.logprobs)
    if not frame.empty:
        changed = frame[frame["changed"]]
        picks = ", ".join(f"`{x}`" for x in changed["label"])
        st.markdown("**Per-token probabilities** (main vs contrast branch)"
                    + (f" · {_changed_by(sp)} changed {len(changed)} token(s): {picks}"
                       if len(changed) else " · the decoder kept the main branch's choice everywhere"))
        st.altair_chart(drawing.probs_chart(frame), width="stretch")
        with st.expander("steps (final_prob and alternatives: the decoder's final distribution)"):
            st.dataframe(frame.drop(columns=["label"]), hide_index=True)


def _changed_by(sp: dict[str, Any]) -> str:
    """Who picked a token other than the main branch's most likely: with sampling on, a draw does that too."""
    if not sp.get("do_sample"):
        return "the decoder"
    return "sampling" if sp.get("decoding", "greedy") in ("greedy", "sample") else "sampling or the decoder"


def _ms(seconds: float) -> str:
    ms = 1000.0 * seconds
    if ms >= 1000:
        return f"{seconds:.2f} s"
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _layers(kept: list[int]) -> str:
    if not kept:
        return "-"
    if len(set(kept)) == 1:
        return f"{kept[0]} at all {len(kept)} layers"
    return " → ".join(f"{v}" for i, v in enumerate(kept) if i == 0 or kept[i - 1] != v) + f" ({len(kept)} layers)"


if __name__ == "__main__":
    render()
