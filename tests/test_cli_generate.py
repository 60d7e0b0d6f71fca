"""`vlmguard generate`: JSON output and one-line errors with a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from vlmguard.cli import main
from vlmguard.testing import random_image


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "img.png"
    random_image(3).save(p)
    return p


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json_last_line(capsys, image):
    rc, out, err = run_cli(capsys, "generate", "--model", "random:llava", "--image", str(image), "--prompt",
                           "is there a dog", "--max-new-tokens", "4", "--json")
    assert rc == 0
    obj = json.loads(out.strip().splitlines()[-1])
    assert len(obj["tokens"]) == 4 and isinstance(obj["text"], str)
    assert obj["visual_tokens"] == 16 and obj["visual_tokens_kept"] == [16] * 4
    assert {"prefill_s", "decode_s", "vision_s", "per_token_s"} <= set(obj["timings"])


def test_a_raw_prompt_is_read_as_it_is(capsys, image):
    """--raw: no chat template; the prompt writes the image placeholder once per image, else one line naming it."""
    from vlmguard.images import load_image
    from vlmguard.results import Request
    from vlmguard.spec import GenerationSpec
    from vlmguard.testing import tiny_engine

    prompt = "<image>\nQ: is there a dog? A:"  # (not what the chat template writes)
    base = ["generate", "--model", "random:llava", "--image", str(image), "--max-new-tokens", "4", "--json"]
    rc, out, _ = run_cli(capsys, *base, "--prompt", prompt, "--raw")
    obj = json.loads(out.strip().splitlines()[-1])
    alone = tiny_engine("llava").generate([Request(prompt, [load_image(image)], raw_prompt=True)],
                                          GenerationSpec(max_new_tokens=4))[0]
    templated = json.loads(run_cli(capsys, *base, "--prompt", "is there a dog")[1].strip().splitlines()[-1])
    assert rc == 0 and obj["tokens"] == alone.token_ids and obj["prompt_tokens"] == alone.prompt_tokens
    assert obj["visual_tokens"] == 16 and obj["prompt_tokens"] != templated["prompt_tokens"]
    rc, _, err = run_cli(capsys, *base, "--prompt", "is there a dog", "--raw")
    assert rc == 2 and "the prompt holds the model's image placeholder '<image>' 0 time(s) for 1 image(s)" in err
    assert err.count("\n") == 1


def test_param_goes_to_the_method_that_has_it(capsys, image, tmp_path, monkeypatch):
    """Issue 2's CLI names one parameter flag, `--param key=value ...`: a pruner's parameter given there went to the
    decoder and was refused ("K: Extra inputs are not permitted"). Each key now goes to the method that has it; a
    key both have, or one given twice, is refused in one line."""
    base = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "2", "--json", "--pruning", "fastv", "--budget", "8"]
    rc, out, _ = run_cli(capsys, *base, "--decoding", "vcd", "--param", "K=1", "alpha=0.5")
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and obj["pruning"]["params"]["K"] == 1 and obj["decoding"]["params"]["alpha"] == 0.5
    assert obj["visual_tokens_kept"] == [16, 8, 8, 8]  # K=1: the cut after layer 0
    rc, _, err = run_cli(capsys, *base, "--decoding", "vcd", "--param", "alpha=0.5", "--decoding-param", "alpha=1")
    assert rc == 2 and err == "vlmguard: error: --decoding-param and --param both give 'alpha'\n"
    rc, _, err = run_cli(capsys, *base, "--param", "nosuch=1")
    assert rc == 2 and "nosuch" in err and err.count("\n") == 1
    from vlmguard.errors import InvalidInput
    from vlmguard.spec import route_params

    assert route_params(["K=3", "beta=0.2"], "fastv", "lqcd") == ({"K": 3}, {"beta": 0.2})
    assert route_params(["lambda=0.05"], "none", "m3id") == ({}, {"lambda": 0.05})  # an alias counts
    monkeypatch.setattr("vlmguard.spec._param_names", lambda kind, method: {"K"})  # a key both methods have
    with pytest.raises(InvalidInput, match="both pruning method 'fastv' and decoding method 'x' have it"):
        route_params(["K=1"], "fastv", "x")
    monkeypatch.undo()
    rc, _, _ = run_cli(capsys, "bench", "pope", "--model", "random:llava", "--dataset", "synthcoco", "--limit", "1",
                       "--pruning", "fastv", "--budget", "8", "--param", "K=1", "--db", str(tmp_path / "r.sqlite"),
                       "--no-progress")
    assert rc == 0


def test_generate_logprobs_in_json_and_as_a_table(capsys, image):
    args = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "4", "--logprobs", "2"]
    rc, out, _ = run_cli(capsys, *args, "--json")
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and [e["token_id"] for e in obj["logprobs"]] == obj["tokens"]
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in obj["logprobs"])
    rc, out, _ = run_cli(capsys, *args)
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 5 and all("top: " in line for line in lines[1:])
    rc, _, err = run_cli(capsys, *args[:-1], "21")
    assert rc != 0 and "logprobs: Input should be less than or equal to 20" in err


def test_generate_prompt_logprobs_in_json_and_as_a_table(capsys, image):
    args = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "2", "--prompt-logprobs", "1"]
    rc, out, _ = run_cli(capsys, *args, "--json")
    obj = json.loads(out.strip().splitlines()[-1])
    entries = obj["prompt_logprobs"]
    assert rc == 0 and len(entries) == obj["prompt_tokens"] and entries[0]["logprob"] is None
    assert sum(e["logprob"] is None for e in entries) == 1 + obj["visual_tokens"]  # the first, and the image's
    rc, out, _ = run_cli(capsys, *args)
    lines = out.strip().splitlines()
    assert rc == 0 and lines[1] == "prompt:" and len(lines) == 2 + obj["prompt_tokens"]
    assert lines[2].split()[-1] == "-" and "top: " in lines[-1]


def test_generate_logit_bias(capsys, image):
    args = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "3", "--json"]
    rc, out, _ = run_cli(capsys, *args, "--logit-bias", "7=100", "--logit-bias", "9=-5")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["tokens"] == [7, 7, 7]
    for bad, needle in (("7=x", "logit_bias.7: Input should be a valid number"),
                        ("7=101", "less than or equal to 100"), ("99999999=1", "past the model's vocabulary")):
        rc, _, err = run_cli(capsys, *args, "--logit-bias", bad)
        assert rc == 2 and needle in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse's own error, with the usage
        run_cli(capsys, *args, "--logit-bias", "7")
    assert "argument --logit-bias: expected TOKEN_ID=BIAS (e.g. 2=-100), got '7'" in capsys.readouterr().err


def test_generate_stop_token_id(capsys, image):
    args = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "3", "--json", "--logit-bias", "7=100"]
    rc, out, _ = run_cli(capsys, *args, "--stop-token-id", "9", "--stop-token-id", "7")
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and obj["tokens"] == [] and obj["finish_reason"] == "stop"  # (7 drawn first: the answer ends)
    rc, _, err = run_cli(capsys, *args, "--stop-token-id", "99999999")
    assert rc == 2 and "stop_token_ids names token id 99999999, past the model's vocabulary" in err


def test_generate_choice(capsys, image):
    args = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "8", "--json"]
    rc, out, _ = run_cli(capsys, *args, "--choice", "a dog", "--choice", "a cat")
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and obj["text"] in ("a dog", "a cat") and obj["finish_reason"] == "stop"
    rc, _, err = run_cli(capsys, *args, "--choice", "")
    assert rc == 2 and "choices.0: String should have at least 1 character" in err and err.count("\n") == 1


def test_generate_structured_output(capsys, image, tmp_path):
    args = ["generate", "--model", "random:llava", "--image", str(image), "--prompt", "is there a dog",
            "--max-new-tokens", "40", "--json"]
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    binary = tmp_path / "binary.lark"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    rc, out, _ = run_cli(capsys, *args, "--json-schema", f"@{tmp_path / 'schema.json'}", "--json-whitespace",
                         "compact")
    obj = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and set(json.loads(obj["text"])) == {"n"} and obj["finish_reason"] == "stop"
    rc, out, _ = run_cli(capsys, *args, "--regex", "(yes|no), [0-9]")
    assert rc == 0 and re.fullmatch(r"(yes|no), [0-9]", json.loads(out.strip().splitlines()[-1])["text"])
    rc, out, _ = run_cli(capsys, *args, "--grammar", 'start: "a " ("red" | "blue") " car"')
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["text"] in ("a red car", "a blue car")
    for extra, needle in ((["--json-schema", "{oops"], "--json-schema is not JSON"),
                          (["--json-schema", "[1]"], "--json-schema must be a JSON object"),
                          (["--grammar", f"@{tmp_path / 'none.lark'}"], "--grammar: cannot read"),
                          (["--grammar", f"@{binary}"], "--grammar: cannot read"),
                          (["--json-schema", f"@{binary}"], "not UTF-8 text"),
                          (["--grammar", f"@{tmp_path}"], "is a directory"),
                          (["--regex", "[a-"], "guided: at 1")):
        rc, _, err = run_cli(capsys, *args, *extra)
        assert rc == 2 and needle in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):  # argparse's own error, with the usage
        run_cli(capsys, *args, "--regex", "a", "--json-object")
    assert "argument --json-object: not allowed with argument --regex" in capsys.readouterr().err


def test_generate_stream_prints_text(capsys, image):
    rc, out, _ = run_cli(capsys, "generate", "--model", "random:llava", "--image", str(image), "--prompt", "hi",
                         "--max-new-tokens", "3", "--stream")
    assert rc == 0
    # the streamed pieces add up to the generated text, printed once, on one line ended by a newline
    rc_json, out_json, _ = run_cli(capsys, "generate", "--model", "random:llava", "--image", str(image), "--prompt",
                                   "hi", "--max-new-tokens", "3", "--json")
    text = json.loads(out_json.strip().splitlines()[-1])["text"]
    assert rc_json == 0 and text.strip()
    assert out.endswith("\n") and out.count("\n") == 1 and out.strip() == text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "/nonexistent/x.png"], "image file not found"),
        (["--image", "BADFILE"], "not a readable image"),
        (["--image", "IMG", "--pruning", "nope", "--budget", "4"], "unknown pruning method 'nope'"),
        (["--image", "IMG", "--decoding", "nope"], "unknown decoding method 'nope'"),
        (["--image", "IMG", "--param", "alpha=1"], "invalid parameters for decoding method 'greedy'"),
        (["--image", "IMG", "--budget", "0", "--pruning", "none"], "budget"),
        (["--image", "IMG", "--max-new-tokens", "600"], "exceeds the model's context"),
    ],
)
def test_bad_input_one_line_error(capsys, image, tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    args = [str(image) if a == "IMG" else str(bad) if a == "BADFILE" else a for a in args]
    rc, out, err = run_cli(capsys, "generate", "--model", "random:llava", "--prompt", "hi", *args)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vlmguard: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err


def test_entry_point_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "vlmguard.cli", "generate", "--model", "random:llava",
                           "--image", "/nonexistent.png", "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "vlmguard: error: image file not found: /nonexistent.png"


def test_json_output_has_no_progress_bars_on_stderr(capsys, image):
    """--json (and --quiet / --no-progress) switch off every progress bar, transformers' "Loading weights"
    bar of the checkpoint load included."""
    rc, out, err = run_cli(capsys, "generate", "--model", "tiny", "--image", str(image), "--prompt",
                           "Is there a dog in the image?", "--max-new-tokens", "2", "--json")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["text"] is not None
    assert "Loading weights" not in err and "it/s" not in err, err
