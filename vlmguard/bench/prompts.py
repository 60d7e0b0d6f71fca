"""Named prompt presets for POPE (benchmarks.md 1.3) and CHAIR (2.4).

The engine applies the model's chat template and inserts the image; a preset decides the user text (question +
answer-format instruction and how they are joined) and the default generation knobs. A preset whose paper sends
LLaVA-1.5 a string of its own (OPERA, HALC) frames the question with it on a LLaVA model under llava-hf's Vicuna
template (``PopePrompt.frame``).
Every run records the preset name, the resulting knobs and the exact user text of each sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vlmguard.errors import InvalidInput

LLAVA_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class PopePrompt:
    name: str
    suffix: str
    joiner: str
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    description: str = ""
    # the LLaVA-1.5 prompt the paper's own code sends after the vicuna_v1 system text ({question}: the rendered
    # user text, <image>: the image), used instead of the chat template on models with llava-hf's Vicuna template
    # (see ``frame``)
    llava_raw: str | None = None

    def render(self, question: str) -> str:
        return question + self.joiner + self.suffix if self.suffix else question

    def frame(self, text: str, adapter: Any) -> tuple[str, bool]:
        """(prompt, raw): the user text as the model's chat template takes it, or, for a preset with its own
        LLaVA-1.5 string on a LLaVA model under llava-hf's Vicuna template, that whole string (a raw prompt)."""
        from vlmguard.models.families import VICUNA_V1_SYSTEM

        default_system = getattr(adapter, "default_system", None)
        placeholder = getattr(adapter, "image_placeholder", None)
        system = default_system() if default_system is not None else None
        if self.llava_raw and placeholder and system == VICUNA_V1_SYSTEM:
            return system + self.llava_raw.replace("<image>", placeholder).replace("{question}", text), True
        return text, False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OPERA_LLAVA = "USER: <image> {question} ASSISTANT:"  # straight after the system text, no space between

POPE_PROMPTS: dict[str, PopePrompt] = {
    p.name: p
    for p in (
        PopePrompt("llava", LLAVA_INSTRUCTION, "\n", 128, description="LLaVA-1.5 / lmms-eval standard: greedy"),
        PopePrompt("llava_space", LLAVA_INSTRUCTION, " ", 128, description="cd_rethink: suffix joined by a space"),
        PopePrompt(
            "vcd",
            "Please answer this question with one word.",
            " ",
            128,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            seed=42,
            description="VCD / RITUAL / AvisC: multinomial sampling T=1, top-p 1, fixed seed",
        ),
        # OPERA's and HALC's code send LLaVA-1.5 their own string, the vicuna_v1 system text straight followed by
        # "USER: <image> {q} ASSISTANT:" (shikiw/OPERA pope_eval.py INSTRUCTION_TEMPLATE, eval_configs/
        # llava-1.5_eval.yaml system_message): a space after the image, not the template's newline
        PopePrompt("opera", "", "", 10, description="OPERA: no answer-format suffix, 10 new tokens",
                   llava_raw=OPERA_LLAVA),
        PopePrompt("halc", "", "", 16, description="HALC: no answer-format suffix, 16 new tokens",
                   llava_raw=OPERA_LLAVA),
    )
}
DEFAULT_POPE_PROMPT = "llava"


@dataclass(frozen=True)
class ChairPreset:
    name: str
    prompt: str
    max_new_tokens: int
    drop_incomplete_sentence: bool
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHAIR_DESCRIBE = "Please describe this image in detail."
CHAIR_PRESETS: dict[str, ChairPreset] = {
    p.name: p
    for p in (
        ChairPreset("chair512", CHAIR_DESCRIBE, 512, False, "OPERA main table / VISTA: 512 new tokens"),
        ChairPreset(
            "chair64", CHAIR_DESCRIBE, 64, True, "short setting: 64 new tokens, drop an incomplete last sentence"
        ),
    )
}
DEFAULT_CHAIR_PRESET = "chair512"


def get_pope_prompt(name: str | None) -> PopePrompt:
    key = name or DEFAULT_POPE_PROMPT
    if key not in POPE_PROMPTS:
        raise InvalidInput(f"unknown POPE prompt preset {key!r} (known: {', '.join(POPE_PROMPTS)})")
    return POPE_PROMPTS[key]


def get_chair_preset(name: str | None) -> ChairPreset:
    key = name or DEFAULT_CHAIR_PRESET
    if key not in CHAIR_PRESETS:
        raise InvalidInput(f"unknown CHAIR preset {key!r} (known: {', '.join(CHAIR_PRESETS)})")
    return CHAIR_PRESETS[key]
