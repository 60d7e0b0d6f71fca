"""Audit of the pruning / decoding method parameters as a user types them (``--pruning-param K=V``,
``--param K=V``, the HTTP API's dicts): every bad value is one ``InvalidInput`` naming the parameter, raised when
the spec resolves (before a model loads or a pre-pass runs), never a silently different method."""
from __future__ import annotations

import typing

import pytest
from PIL import Image

from vlmguard.cli import main
from vlmguard.decoding import DECODERS
from vlmguard.errors import InvalidInput
from vlmguard.pruning import PRUNERS
from vlmguard.spec import GenerationSpec, parse_params


def resolve(pruning="none", budget=None, pruning_params=None, decoding="greedy", decoding_params=None):
    return GenerationSpec(pruning=pruning, budget=budget, pruning_params=pruning_params or {}, decoding=decoding,
                          decoding_params=decoding_params or {}).resolve()


def refused(*needles, **spec):
    with pytest.raises(InvalidInput) as e:
        resolve(**spec)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _numeric(annotation) -> bool:
    """Whether a field's type takes ints or floats (alone, in a list / tuple, or optional)."""
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation))


def _number_fields():
    for registry, kind in ((PRUNERS, "pruning"), (DECODERS, "decoding")):
        for name in registry.names():
            for field, info in registry.get(name).Params.model_fields.items():
                if _numeric(info.annotation):
                    yield kind, name, info.alias or field


# ---- JSON true / false is no number ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,method,field", list(_number_fields()))
def test_number_params_refuse_booleans(kind, method, field):
    # pydantic reads true as 1: `--pruning-param K=true` ran FastV with K=1, `noise_step=true` VCD at step 1
    for value in (True, [True, 2]):
        if kind == "pruning":
            spec = dict(pruning=method, budget=16, pruning_params={field: value})
        else:
            spec = dict(decoding=method, decoding_params={field: value})
        refused(f"{field}: must be a number, not a boolean", f"{kind} method {method!r}", **spec)


def test_every_method_has_number_params_checked():
    found = {(m, f) for _, m, f in _number_fields()}
    assert {("fastv", "K"), ("random", "seed"), ("adaptinfer", "layers"), ("vcd", "noise_step"),
            ("m3id", "lambda"), ("vista", "vsv_layers"), ("iava", "fixed_layers"), ("lqcd", "alpha")} <= found


def test_cli_values_still_parse_as_numbers():
    pruner, decoder = resolve("fastv", None, parse_params(["K=3"]), "vcd",
                              parse_params(["alpha=0.5", "noise_step=250.0", "noise_seed=7"]))
    assert pruner.params.K == 3 and isinstance(pruner.params.K, int)
    assert (decoder.params.alpha, decoder.params.noise_step, decoder.params.noise_seed) == (0.5, 250, 7)
    # real booleans stay booleans
    _, decoder = resolve(decoding="m3id", decoding_params=parse_params(["gate=false", "lambda=0.03"]))
    assert decoder.params.gate is False and decoder.params.lam == 0.03



@pytest.mark.parametrize("field", ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty",
                                   "frequency_penalty", "repetition_penalty", "budget", "logprobs"])
def test_spec_number_fields_refuse_booleans(field):
    # the HTTP API's native "spec" and a Python caller: max_new_tokens true used to be one token, seed false seed 0
    with pytest.raises(InvalidInput, match=f"{field}: .*not a boolean"):
        GenerationSpec.build(**{field: True})
    # booleans stay booleans
    spec = GenerationSpec.build(do_sample=True, diagnostics=False)
    assert spec.do_sample is True and spec.diagnostics is False


@pytest.mark.parametrize("field", ["max_tokens", "temperature", "top_p", "seed", "n", "top_logprobs"])
def test_chat_request_number_fields_refuse_booleans(field):
    from pydantic import ValidationError

    from vlmguard.api_schema import ChatCompletionRequest

    body = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(**body, **{field: True})
    (err,) = e.value.errors()
    assert err["loc"] == (field,) and err["msg"] == "must be a number, not a boolean"  # the API's param names it
    assert ChatCompletionRequest(**body, logprobs=True, stream=True).logprobs is True  # OpenAI's boolean logprobs
    with pytest.raises(ValidationError, match="must be a number, not a boolean"):
        ChatCompletionRequest(**body, vlmguard={"budget": True})


def test_every_method_params_class_is_a_method_params():
    from vlmguard.spec import MethodParams

    for registry in (PRUNERS, DECODERS):
        for name in registry.names():
            assert issubclass(registry.get(name).Params, MethodParams), name

# ---- AdaptInfer's explicit schedule: checked when the spec resolves -----------------------------------------

@pytest.mark.parametrize("params,needles", [
    ({"keeps": [8]}, ["'keeps' needs explicit 'layers'"]),
    ({"layers": []}, ["at least one stage layer"]),
    ({"layers": [1, 1]}, ["stage layers must be strictly increasing", "[1, 1]"]),
    ({"layers": [2, 1]}, ["stage layers must be strictly increasing", "[2, 1]"]),
    ({"layers": [-1]}, ["stage layers must be >= 0", "[-1]"]),
    ({"layers": [0, 1], "keeps": [8]}, ["2 stage layers but 1 keep counts"]),
    ({"layers": [0, 1], "keeps": [8, -1]}, ["keep counts must be >= 0"]),
    ({"layers": [0, 1], "keeps": [8, 9]}, ["keep counts must not increase"]),
])
def test_adaptinfer_layers_and_keeps_checked_before_any_model(params, needles):
    # these failed only in check_budget: after the model loaded, the prompt was encoded and a decoder's pre-pass
    # (VISTA's P+/P- prefill, IAVA's probe) had run
    refused(*needles, pruning="adaptinfer", budget=16, pruning_params=params)


def test_adaptinfer_valid_explicit_schedule_still_resolves():
    pruner, _ = resolve("adaptinfer", 16, {"layers": [0, 2], "keeps": [40, 10]})
    assert pruner.params.layers == [0, 2] and pruner.params.keeps == [40, 10]


# ---- blank texts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "   ", [], ["Is there a dog?", " "]])
def test_lqcd_blank_neutral_text_refused(value):
    # an oracle neutral query "" made the expert branch the image with no question at all
    refused("neutral_text", "must not be", decoding="lqcd", decoding_params={"neutral_text": value})


def test_lqcd_neutral_text_valid_forms_still_resolve():
    for value in ("Is there a dog in the image?", ["Is there a dog?", None]):
        _, decoder = resolve(decoding="lqcd", decoding_params={"neutral_text": value})
        assert decoder.params.neutral_text == value


def test_iava_blank_generic_instruction_refused():
    refused("generic_instruction: must not be blank", decoding="iava",
            decoding_params={"generic_instruction": "  \n "})


# ---- one clear message -------------------------------------------------------------------------------------

def test_model_level_errors_are_not_repeated_or_prefixed():
    msg = refused("vsv_layers must be (start, end) with 0 <= start < end", decoding="vista",
                  decoding_params={"vsv_layers": [3, 1]})
    assert msg.count("parameters for decoding method 'vista'") == 1, msg
    assert "Value error" not in msg
    msg = refused("qwen_vit_keep", "must be 0 (no ViT stage) or >= 1", pruning="flowcut", budget=16,
                  pruning_params={"qwen_vit_keep": 0.5})
    assert "Value error" not in msg


# ---- the command line: refused before the model loads --------------------------------------------------------

@pytest.fixture()
def no_model(monkeypatch):
    import vlmguard.engine

    def forbidden(*args, **kwargs):
        raise AssertionError("the model loaded before the bad parameter was reported")

    monkeypatch.setattr(vlmguard.engine.Engine, "load", forbidden)


@pytest.mark.parametrize("args,needle", [
    (["--pruning", "adaptinfer", "--budget", "16", "--pruning-param", "keeps=[8]", "--decoding", "vista"],
     "'keeps' needs explicit 'layers'"),
    (["--pruning", "adaptinfer", "--budget", "16", "--pruning-param", "layers=[1,1]"],
     "stage layers must be strictly increasing"),
    (["--pruning", "fastv", "--pruning-param", "K=true"], "K: must be a number, not a boolean"),
    (["--decoding", "vcd", "--param", "noise_step=true"], "noise_step: must be a number, not a boolean"),
    (["--decoding", "lqcd", "--param", "neutral_text="], "neutral_text: must not be blank"),
])
def test_generate_refuses_bad_method_params_first(capsys, no_model, tmp_path, args, needle):
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    rc = main(["generate", "--image", str(img), "--prompt", "Is there a dog?", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("vlmguard: error:") and err.count("\n") == 1, err
    assert needle in err, err


# ---- repeated or empty values that used to pass silently ---------------------------------------------------

def test_a_key_given_twice_is_refused():
    # `--pruning-param K=2 --pruning-param K=3` ran K=3 without a word
    with pytest.raises(InvalidInput, match="--pruning-param gives 'K' twice"):
        parse_params(["K=2", "K=3"], "--pruning-param")
    assert parse_params(["K=2", "query=all"], "--pruning-param") == {"K": 2, "query": "all"}


def test_iava_fixed_layers_named_twice_refused():
    # [1, 1, 2] counted layer 1 twice in the average of the chosen layers' attention
    refused("fixed_layers: names a layer twice: [1, 1, 2]", decoding="iava", decoding_params={"fixed_layers": [1, 1, 2]})
    _, decoder = resolve(decoding="iava", decoding_params={"fixed_layers": [2, 1]})
    assert decoder.params.fixed_layers == [2, 1]


def test_adaptinfer_empty_schedule_path_refused():
    # `schedule=` read the current directory: "cannot read schedule file .: Is a directory"
    refused("'schedule' is empty", pruning="adaptinfer", budget=16, pruning_params={"schedule": "  "})
