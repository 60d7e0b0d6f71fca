"""The widgets a request is made from, shared by the Playground and the Chat: the image, the pruner and decoder
with their parameters, the token selection.

Every widget's key begins with the page's prefix (``pg`` for the playground, ``ch`` for the chat), so each page
keeps its own choices.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import streamlit as st
from PIL import Image

from vlmguard.dashboard import drawing, images
from vlmguard.dashboard.service import selection_kwargs
from vlmguard.dashboard.ui import params_form
from vlmguard.errors import VlmguardError
from vlmguard.spec import IMAGE_ASPECTS, parse_budget

NO_IMAGE = "no image (text only)"


@dataclass
class MethodChoice:
    """A pruner and a decoder as the widgets chose them (``budget`` None: pruning ``none``, or unreadable)."""

    pruning: str
    budget: int | float | None
    decoding: str
    pruning_params: dict[str, Any] = field(default_factory=dict)
    decoding_params: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """A request can be made: a pruner other than ``none`` needs a budget it could read."""
        return self.pruning == "none" or self.budget is not None


def index_of(options: list[str], preferred: str) -> int:
    return options.index(preferred) if preferred in options else 0


def method_inputs(schemas: dict[str, dict[str, dict[str, Any]]], prefix: str, *, pruning: str = "fastv",
                  decoding: str = "vcd") -> MethodChoice:
    """A pruner (with its budget) and a decoder, side by side, each with its parameters in an expander."""
    c1, c2 = st.columns(2)
    with c1:
        pruners = list(schemas["pruning"])
        pr = st.selectbox("pruner", pruners, index=index_of(pruners, pruning), key=f"{prefix}_pruning")
        budget = budget_input(pr, f"{prefix}_budget")
        with st.expander("pruner parameters"):
            pruning_params = params_form(schemas["pruning"][pr], f"{prefix}_pp_{pr}")
    with c2:
        decoders = list(schemas["decoding"])
        dec = st.selectbox("decoder", decoders, index=index_of(decoders, decoding), key=f"{prefix}_decoding")
        with st.expander("decoder parameters"):
            decoding_params = params_form(schemas["decoding"][dec], f"{prefix}_dp_{dec}")
    return MethodChoice(pr, budget, dec, pruning_params, decoding_params)


def budget_input(pruning: str, key: str) -> int | float | None:
    if pruning == "none":
        return None
    text = st.text_input("budget: visual tokens kept (e.g. 36) or kept fraction (e.g. 0.25)", "0.25", key=key)
    try:
        return parse_budget(text)
    except ValueError as e:
        st.error(str(e))
        return None


def selection_inputs(prefix: str, token_ids: Callable[[str], list[int]] | None = None
                     ) -> tuple[dict[str, Any], bool]:
    """Temperature, sampling seed, top-p and min-p, the three penalties, token biases, the answer's choices and format
    (``selection_kwargs``: only what differs from greedy, free answers), and whether they can be sent (a bias
    that names no single token cannot). ``token_ids``: a word's token ids under the model (the service's
    /tokenize); without it there is no bias input."""
    s1, s2 = st.columns(2)
    with s1:
        temperature = st.slider("temperature (0 = greedy)", 0.0, 2.0, 0.0, 0.05, key=f"{prefix}_temperature")
        seed = int(st.number_input("sampling seed", min_value=0, value=0, step=1, key=f"{prefix}_sample_seed"))
        top_p = st.slider("top-p (1 = off; when sampling)", 0.05, 1.0, 1.0, 0.05, key=f"{prefix}_top_p")
        repetition = st.slider("repetition penalty (1 = off)", 0.5, 2.0, 1.0, 0.05, key=f"{prefix}_repetition")
    with s2:
        presence = st.slider("presence penalty", -2.0, 2.0, 0.0, 0.1, key=f"{prefix}_presence")
        frequency = st.slider("frequency penalty", -2.0, 2.0, 0.0, 0.1, key=f"{prefix}_frequency")
        min_p = st.slider("min-p (0 = off; when sampling)", 0.0, 1.0, 0.0, 0.01, key=f"{prefix}_min_p",
                          help="leave out tokens less likely than min-p x the most likely one")
    text = st.text_input("answer choices, comma-separated (empty: any answer)", "", key=f"{prefix}_choices",
                         help="the answer must be one of these, e.g. Yes, No (guided choice)")
    choices = [c.strip() for c in text.split(",") if c.strip()]
    bias, ok = bias_input(prefix, token_ids) if token_ids is not None else ({}, True)
    selection = selection_kwargs(temperature, seed, presence, frequency, repetition, choices, format_input(prefix),
                                 top_p=top_p, min_p=min_p)
    return ({**selection, "logit_bias": bias} if bias else selection), ok


def token_ids(client: Any, model: str) -> Callable[[str], list[int]]:
    """A word's token ids under ``model``, from the service (``/tokenize``, no special tokens)."""
    return lambda word: list(client.tokenize(word, model=model, add_special_tokens=False).tokens)


def bias_input(prefix: str, token_ids: Callable[[str], list[int]]) -> tuple[dict[int, float], bool]:
    """OpenAI's logit_bias, typed as words: ``Yes=-100, No=5`` -> {id of "Yes": -100, id of "No": 5}, each word
    looked up with ``token_ids`` and refused (shown, and the request held back) unless it is one token."""
    text = st.text_input("token bias, WORD=BIAS comma-separated (-100 bans a word, 100 forces it)", "",
                         key=f"{prefix}_bias", help="e.g. Yes=-100, No=5: each word must be one token of the model")
    bias: dict[int, float] = {}
    problems = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        word, eq, value = item.rpartition("=")
        try:
            number = float(value) if eq and word.strip() else None
        except ValueError:
            number = None
        if number is None or not -100 <= number <= 100:
            problems.append(f"{item!r} is not WORD=BIAS with a bias from -100 to 100")
            continue
        try:
            ids = token_ids(word.strip())
        except VlmguardError as e:
            problems.append(f"{word.strip()!r}: {e}")
            continue
        if len(ids) != 1:
            problems.append(f"{word.strip()!r} is {len(ids)} tokens for this model (a bias names one token)")
            continue
        bias[ids[0]] = number
    for problem in problems:
        st.error(problem)
    return bias, not problems


FORMATS = {"free text": None, "regular expression": "regex", "JSON schema": "json_schema",
           "any JSON object": "json_object", "Lark grammar": "grammar"}


def format_input(prefix: str) -> dict[str, Any] | None:
    """The answer's format (GenerationSpec.guided): free text, or a regex, a JSON schema, any JSON object, a Lark
    grammar; None for free text or a schema that is not JSON (its error shown)."""
    kind = FORMATS[st.selectbox("answer format", list(FORMATS), key=f"{prefix}_format",
                                help="hold the answer to a format, token by token (structured output)")]
    if kind is None:
        return None
    guided: dict[str, Any] = {"json_object": True}
    if kind != "json_object":
        hint = {"regex": "e.g. (Yes|No)", "json_schema": 'e.g. {"type": "object", "properties": {"count": '
                '{"type": "integer"}}}', "grammar": 'e.g. start: "A " NOUN "."  NOUN: "dog" | "cat"'}[kind]
        text = st.text_area(kind.replace("_", " "), "", key=f"{prefix}_format_text", help=hint)
        if not text.strip():
            st.info(f"write the {kind.replace('_', ' ')} the answer follows ({hint})")
            return None
        if kind == "json_schema":
            try:
                guided = {"json_schema": json.loads(text)}
            except ValueError as e:
                st.error(f"the JSON schema is not JSON: {e}")
                return None
        else:
            guided = {kind: text}
    if kind.startswith("json") and st.checkbox("compact JSON (no whitespace outside strings)", value=False,
                                               key=f"{prefix}_format_compact"):
        guided["whitespace"] = "compact"
    return guided


def aspect_input(prefix: str) -> str:
    """How the image is read: the checkpoint's processor, padded to a square, or the family's own."""
    return st.selectbox("image preprocessing", IMAGE_ASPECTS, key=f"{prefix}_image_aspect",
                        help="native: the checkpoint's processor (LLaVA-1.5 crops the centre square); pad: padded to "
                        "a square first, as LLaVA-1.5 was trained; reference: the family's own")


def image_digest(image: Image.Image) -> tuple[Any, ...]:
    """An image by its size, mode and a digest of its pixels: what tells one input image from another."""
    return image.size, image.mode, hashlib.sha256(image.tobytes()).hexdigest()


def image_input(prefix: str, text_only: bool = False) -> tuple[Image.Image | None, list[str]]:
    """A cached SynthCOCO test image, a freshly rendered scene or an upload; with a rendered scene, the objects
    it shows. ``text_only`` offers no image as a last choice (``NO_IMAGE``), which returns None as a pending upload
    does: ``chose_no_image`` tells them apart."""
    names = images.synth_sample_names()
    sources = (["SynthCOCO test image"] if names else []) + ["render a SynthCOCO scene", "upload an image"]
    src = st.radio("image", sources + ([NO_IMAGE] if text_only else []), key=f"{prefix}_source", horizontal=True)
    objects: list[str] = []
    image = None
    if src == NO_IMAGE:
        return None, objects
    if src == "SynthCOCO test image":
        name = st.selectbox("sample", names, key=f"{prefix}_sample")
        image = images.load_synth_sample(name)
    elif src == "render a SynthCOCO scene":
        seed = int(st.number_input("scene seed", min_value=0, value=1, step=1, key=f"{prefix}_seed"))
        image, objects = images.render_synth_scene(seed)
    else:
        up = st.file_uploader("image file", type=["png", "jpg", "jpeg", "webp", "bmp"], key=f"{prefix}_upload")
        if up is not None:
            try:
                image = images.load_upload(up.getvalue())
            except VlmguardError as e:
                st.error(str(e))
    if image is not None:
        st.image(drawing.display_image(image, 256), caption=f"input ({image.size[0]}x{image.size[1]})")
    return image, objects


def chose_no_image(prefix: str) -> bool:
    """``image_input(prefix, text_only=True)`` was answered with no image (not with an upload still to come)."""
    return st.session_state.get(f"{prefix}_source") == NO_IMAGE
