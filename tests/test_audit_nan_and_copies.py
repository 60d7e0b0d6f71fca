"""Audit of f1b6a06 (a request whose scores turn NaN mid-answer ends with an error) and 7772e11 (copies of one
request are prefilled once under plain decoding). Each test here failed on the code as audited, for the defect
it names."""
from __future__ import annotations

import pytest
import torch

from vlmguard.decode_batch import DecodeBatch
from vlmguard.errors import ContextTooLong, InvalidInput
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine


def _own_engine():
    """A private tiny LLaVA (never the shared, cached tiny_engine: its dtype changes here)."""
    from vlmguard.engine import Engine
    from vlmguard.testing import FAMILIES

    model, proc = FAMILIES["llava"](seed=0)
    return Engine(model, proc, name="tiny-llava-audit")


@pytest.fixture
def nan_at(monkeypatch):
    """From decode step ``step`` on, the scores of the request with stream index ``index`` are NaN."""
    where: dict[str, int] = {}
    original = DecodeBatch._combine

    def combine(self, blocks):
        out = original(self, blocks)
        if where and self.cohorts[0].step >= where["step"]:
            for j, lv in enumerate(self.lives):
                if lv.index == where["index"]:
                    out.scores[j] = float("nan")
        return out

    monkeypatch.setattr(DecodeBatch, "_combine", combine)

    def set_(index: int, step: int) -> None:
        where.update(index=index, step=step)

    return set_


# ---- f1b6a06: the NaN error names the wrong dtype ---------------------------------------------------------------

def test_mid_answer_nan_of_a_float16_model_names_float16_not_float32(nan_at):
    """The decode loop names ``self.logits.dtype``, but the adapter's logits are always float32
    (``ModelAdapter.logits`` upcasts): a float16 model overflowing mid-answer -- the very case the message is
    for -- is reported as "(float32 weights): the weights or the input are broken"."""
    eng = _own_engine()
    eng.model.to(torch.float16)
    nan_at(index=0, step=1)
    res = eng.generate([Request("describe the photo", [random_image(1, (40, 32))])],
                       GenerationSpec(max_new_tokens=4))[0]
    assert res.finish_reason == "error"
    assert "(float16 weights): float16 overflows in this model" in res.error, res.error


# ---- 7772e11: errors of the copies path name the wrong request -------------------------------------------------

def test_context_error_of_a_copy_names_that_copy():
    """Copies are prefilled as a shorter list: the context check names the position in that list (request 0),
    not the request that asks for too many tokens (request 1), as every other decoder does."""
    eng = tiny_engine("llava")
    req = Request("describe the photo", [random_image(1, (40, 32))])
    specs = [GenerationSpec(max_new_tokens=2), GenerationSpec(max_new_tokens=eng.context_length)]
    with pytest.raises(ContextTooLong, match=r"^request 1: "):
        eng.generate([req, req], specs)


def test_bad_request_after_copies_is_named_by_its_own_position():
    """[a, a, bad]: the bad request is request 2, the copies path reports it as request 1."""
    eng = tiny_engine("llava")
    a = Request("describe the photo", [random_image(1, (40, 32))])
    with pytest.raises(InvalidInput, match=r"^request 2: empty prompt and no image"):
        eng.generate([a, a, Request("  ", [])], GenerationSpec(max_new_tokens=2))


def test_copy_detection_never_raises_a_traceback_on_an_unhashable_field():
    """``_copies`` hashed ``raw_prompt`` unchecked: a request whose flag is a list failed with ``TypeError:
    unhashable type`` under plain decoding, even alone. ``raw_prompt`` is a bool: anything else is now one clear
    error, checked before the copies are looked for, under every decoder."""
    eng = tiny_engine("llava")
    req = Request("hi", [], raw_prompt=[])  # type: ignore[arg-type]
    for spec in (GenerationSpec(decoding="vcd", max_new_tokens=2), GenerationSpec(max_new_tokens=2)):
        with pytest.raises(InvalidInput, match="request 0: raw_prompt must be true or false"):
            eng.generate([req, req], spec)
