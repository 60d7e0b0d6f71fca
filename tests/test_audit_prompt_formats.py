"""Audit: the exact prompt (string and token ids) each family and POPE/CHAIR preset sends to a model.

References:
- LLaVA-1.5 / LLaVA-NeXT-Vicuna: LLaVA's evaluation (conv_mode vicuna_v1, /work/shared/benchmarks.md lines 124-127:
  system "A chat between ... questions.", "USER: <image>\\n{q}\\nAnswer the question using a single word or
  phrase. ASSISTANT:") and the llava-hf checkpoints' chat_template.json (llava-1.5-*-hf, llava-v1.6-vicuna-*-hf;
  vlmguard/models/shapes.py holds them, copied from the fallback map in openvinotoolkit/openvino.genai
  src/cpp/src/tokenizer.cpp, which embeds the checkpoints' templates verbatim). LLaVA-NeXT-Mistral: llava-v1.6-mistral-7b-hf's template and LLaVA's
  conv "mistral_instruct" (empty system): "[INST] <image>\\n{q} [/INST]". Qwen2-VL: Qwen2-VL-*-Instruct's template
  (default system turn "You are a helpful assistant.", image as <|vision_start|><|image_pad|><|vision_end|> before
  the text).
- POPE text: refdata/pope/llava15_e3e3926/llava_pope_test.reconstructed.jsonl (LLaVA's question file: q + "\\n" +
  suffix); cd_rethink (space joiner, refdata/MANIFEST.md); VCD (q + " Please answer this question with one
  word.", benchmarks.md line 132); OPERA / HALC (no suffix, benchmarks.md line 134); CHAIR "Please describe this
  image in detail." (benchmarks.md line 274).

Defects found (fixed, each test below fails on the old code):
1. llava-hf's Vicuna template has no system text, so LLaVA-1.5 / LLaVA-NeXT-Vicuna checkpoints got
   "USER: <image>\\n... ASSISTANT:" without vicuna_v1's system prompt (families.py LlavaAdapter.default_system,
   base.py format_prompt).
2. A templated / raw prompt that writes BOS itself got a second BOS from the tokenizer (base.py encode).
3. The shape stand-ins (shapes.py) used a template without the system turn (LLaVA and Qwen2-VL) and a Qwen2-VL
   tokenizer that adds a BOS the real one does not add.
4. OPERA / HALC send "<s>A chat ... questions.USER: <image> {q} ASSISTANT:" (no space after the system text, a
   space, not a newline, after the image); the "opera" / "halc" presets gave the model's template, "... USER:
   <image>\\n{q} ASSISTANT:". They now send that string as a raw prompt on llava-hf's Vicuna template
   (PopePrompt.frame, bench/runner.py).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tokenizers import processors
from transformers import LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmguard.bench.prompts import CHAIR_PRESETS, POPE_PROMPTS, get_chair_preset, get_pope_prompt
from vlmguard.errors import InvalidInput
from vlmguard.models.base import Prompt
from vlmguard.models.families import VICUNA_V1_SYSTEM, LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter
from vlmguard.models.image_text_processor import ImageTextProcessor
from vlmguard.models.shapes import LLAVA_HF_VICUNA_TEMPLATE as HF_VICUNA
from vlmguard.models.shapes import QWEN_CHAT_TEMPLATE as QWEN2_VL
from vlmguard.testing import make_tokenizer, random_image

# ---- the checkpoints' own templates (verbatim; llava-hf Vicuna's and Qwen2-VL's: the shapes' own copies) -----
HF_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
Q = "Is there a dog in the image?"
# the user text of every preset, as each reference sends it
USER_TEXT = {
    "llava": Q + "\nAnswer the question using a single word or phrase.",
    "llava_space": Q + " Answer the question using a single word or phrase.",
    "vcd": Q + " Please answer this question with one word.",
    "opera": Q,
    "halc": Q,
}
CHAIR_TEXT = "Please describe this image in detail."


def llama_like_tokenizer():
    """A stand-in for LLaVA's Llama tokenizer: spaces and newlines are tokens of their own, BOS is prepended."""
    tok = make_tokenizer(["<image>"])
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tok


def llava_adapter(template: str, cls=LlavaAdapter):
    tok = llama_like_tokenizer()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template, image_token="<image>")
    a = cls.__new__(cls)
    a.processor, a.tokenizer = proc, tok
    a.config = SimpleNamespace(image_token_id=tok.convert_tokens_to_ids("<image>"))
    return a


def qwen_adapter():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>",
                          "<|im_end|>"])
    ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                  max_pixels=32 * 32)
    a = Qwen2VLAdapter.__new__(Qwen2VLAdapter)
    a.processor = ImageTextProcessor(tok, ip, chat_template=QWEN2_VL)
    a.tokenizer = tok
    a.config = SimpleNamespace(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"))
    return a


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- presets: the user text --------------------------------------------------------------------------------
def test_pope_presets_render_the_reference_user_text(shared_dir):
    assert set(POPE_PROMPTS) == set(USER_TEXT)
    for name, text in USER_TEXT.items():
        assert get_pope_prompt(name).render(Q) == text, name
    assert get_pope_prompt(None).name == "llava"
    assert (get_pope_prompt("opera").max_new_tokens, get_pope_prompt("halc").max_new_tokens) == (10, 16)
    # LLaVA's own question file: question + "\n" + suffix, for every line
    base = shared_dir / "refdata/pope/llava15_e3e3926"
    llava_file = [json.loads(x) for x in (base / "llava_pope_test.reconstructed.jsonl").read_text().splitlines()]
    adv = [json.loads(x) for x in (base / "coco_pope_adversarial.json").read_text().splitlines()]
    for q, ref in zip(adv, llava_file[:len(adv)]):
        assert get_pope_prompt("llava").render(q["text"]) == ref["text"]


def test_chair_presets_use_the_reference_instruction():
    for name in CHAIR_PRESETS:
        assert get_chair_preset(name).prompt == CHAIR_TEXT


# ---- LLaVA-1.5 / LLaVA-NeXT-Vicuna: vicuna_v1 --------------------------------------------------------------
def vicuna_reference(user_text: str) -> str:
    return f"{SYSTEM} USER: <image>\n{user_text} ASSISTANT:"


def test_llava15_and_next_vicuna_prompt_strings_are_vicuna_v1():
    assert VICUNA_V1_SYSTEM == SYSTEM
    for cls in (LlavaAdapter, LlavaNextAdapter):
        a = llava_adapter(HF_VICUNA, cls)
        for name, text in [*USER_TEXT.items(), ("chair", CHAIR_TEXT)]:
            got = a.format_prompt(Prompt(text=text, images=[random_image(0)]))
            assert got == vicuna_reference(text), (cls.__name__, name)
        # a request's own system text replaces the default; an empty one means none
        got = a.format_prompt(Prompt(text=Q, images=[random_image(0)], system="Be brief."))
        assert got == f"Be brief. USER: <image>\n{Q} ASSISTANT:"
        got = a.format_prompt(Prompt(text=Q, images=[random_image(0)], system=""))
        assert got == f"USER: <image>\n{Q} ASSISTANT:"


def test_a_conversation_gets_the_default_system_text_as_one_message_does():
    """A multi-turn chat request (the OpenAI API's messages) goes through the adapter too: under llava-hf's Vicuna
    template it gets vicuna_v1's system text when it names none, as a one-message request does (it got none);
    its own system turn replaces it; a conversation the template refuses is the request's error, not a 500."""
    a = llava_adapter(HF_VICUNA)
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
             {"role": "user", "content": [{"type": "text", "text": "And a cat?"}]}]
    assert a.format_messages(turns) == f"{SYSTEM} USER: <image>\n{Q} ASSISTANT: Yes USER: And a cat? ASSISTANT:"
    own = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *turns]
    assert a.format_messages(own).startswith("Be brief. USER: <image>")
    assert a.format_messages(turns[:1]) == a.format_prompt(Prompt(text=Q, images=[random_image(0)]))
    strict = llava_adapter("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                           "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}USER: ASSISTANT:")
    with pytest.raises(InvalidInput, match="chat template refuses these messages: roles must alternate") as e:
        strict.format_messages([turns[0], turns[0]])
    assert e.value.param == "messages"


def test_llava15_token_ids_one_bos_and_the_spaces_around_the_image():
    a = llava_adapter(HF_VICUNA)
    tok = a.tokenizer
    img = a.image_token_id
    for text in [*USER_TEXT.values(), CHAIR_TEXT]:
        ids = a.encode([Prompt(text=text, images=[random_image(1)])]).input_ids[0].tolist()
        n_img = ids.count(img)
        assert n_img == 16  # (32 / 8) ** 2 patches, CLS dropped
        # reference (LLaVA tokenizer_image_token): BOS + chunk before <image> + image + chunk after, nothing lost
        expected = ([tok.bos_token_id] + enc(tok, SYSTEM + " USER: ") + [img] * n_img
                    + enc(tok, "\n" + text + " ASSISTANT:"))
        assert ids == expected
        assert ids.count(tok.bos_token_id) == 1
        k = ids.index(img)
        assert tok.convert_ids_to_tokens([ids[k - 1], ids[k + n_img]]) == [" ", "\n"]
    ids = a.encode([Prompt(text=USER_TEXT["llava"], images=[random_image(1)])]).input_ids[0].tolist()
    v = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", " ", "\n", " USER", ":", " ASSISTANT")}
    assert ids[:1] == [v["<s>"]] and ids[-2:] == [v[" ASSISTANT"], v[":"]]
    k = ids.index(img)
    assert ids[k - 3:k] == [v[" USER"], v[":"], v[" "]] and ids[k + 16] == v["\n"]
    assert ids == LLAVA_IDS  # pinned on the stand-in vocabulary (testing.make_tokenizer)


LLAVA_IDS = [
    1, 64, 133, 40, 45, 5, 57, 133, 39, 42, 57, 60, 42, 42, 51, 134, 133, 40, 58, 55, 46, 52, 58, 56, 165, 150, 135,
    133, 5, 55, 57, 46, 43, 46, 40, 46, 5, 49, 133, 46, 51, 57, 42, 49, 49, 46, 44, 42, 51, 40, 42, 166, 113, 133, 83,
    45, 42, 166, 133, 44, 46, 59, 42, 56, 133, 45, 42, 49, 53, 43, 58, 49, 111, 133, 41, 42, 57, 5, 46, 49, 42, 41, 111,
    150, 133, 53, 52, 49, 46, 57, 42, 133, 5, 51, 56, 60, 42, 55, 56, 133, 57, 52, 136, 165, 106, 56, 133, 54, 58, 42,
    56, 57, 46, 52, 51, 56, 113, 163, 115, 133, *[4] * 16, 132, 72, 56, 138, 134, 141, 139, 136, 140, 120, 132, 64, 51,
    56, 60, 42, 55, 136, 133, 54, 58, 42, 56, 57, 46, 19, 133, 58, 56, 46, 51, 44, 134, 133, 56, 46, 51, 44, 49, 42,
    133, 60, 52, 55, 41, 133, 52, 55, 133, 53, 45, 55, 5, 56, 42, 113, 164, 115]
QWEN_IDS = [
    8, 43, 137, 93, 57, 63, 138, 10, 60, 47, 139, 138, 50, 47, 54, 58, 48, 63, 54, 171, 118, 9, 137, 8, 41, 137, 4,
    5, 5, 5, 5, 6, 77, 61, 143, 139, 146, 144, 141, 145, 125, 137, 69, 56, 61, 65, 47, 60, 141, 138, 59, 63, 47, 61,
    62, 51, 24, 138, 63, 61, 51, 56, 49, 139, 138, 61, 51, 56, 49, 54, 47, 138, 65, 57, 60, 46, 138, 57, 60, 138, 58,
    50, 60, 10, 61, 47, 118, 9, 137, 8, 42, 137]


def test_raw_prompt_that_writes_bos_gets_one_bos():
    a = llava_adapter(HF_VICUNA)
    tok = a.tokenizer
    raw = a.format_prompt(Prompt(text=Q, images=[random_image(0)]))
    one = a.encode([Prompt(text=raw, images=[random_image(2)], raw=True)]).input_ids[0].tolist()
    two = a.encode([Prompt(text="<s>" + raw, images=[random_image(2)], raw=True)]).input_ids[0].tolist()
    assert one == two and two.count(tok.bos_token_id) == 1 and two[0] == tok.bos_token_id


# ---- LLaVA-NeXT-Mistral: mistral_instruct (no system) -------------------------------------------------------
def test_llava_next_mistral_prompt_has_no_system():
    a = llava_adapter(HF_MISTRAL, LlavaNextAdapter)
    for text in [*USER_TEXT.values(), CHAIR_TEXT]:
        assert a.format_prompt(Prompt(text=text, images=[random_image(0)])) == f"[INST] <image>\n{text} [/INST]"


def test_model_own_template_without_the_hf_vicuna_marks_gets_no_default_system():
    from vlmguard.synth.processor import CHAT_TEMPLATE

    a = llava_adapter(CHAT_TEMPLATE)  # vlmguard's synthetic models were trained without a system turn
    assert a.format_prompt(Prompt(text=Q, images=[random_image(0)])) == f"USER: <image>\n{Q} ASSISTANT:"


# ---- Qwen2-VL ------------------------------------------------------------------------------------------------
def qwen_reference(user_text: str) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{user_text}<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_vl_prompt_strings_and_ids():
    a = qwen_adapter()
    tok = a.tokenizer
    img = a.image_token_id
    for text in [*USER_TEXT.values(), CHAIR_TEXT]:
        p = Prompt(text=text, images=[random_image(3, (32, 32))])
        assert a.format_prompt(p) == qwen_reference(text)
        ids = a.encode([p]).input_ids[0].tolist()
        n_img = ids.count(img)
        assert n_img == 4  # 32x32 px, 8 px patches, 2x2 merge
        before, after = qwen_reference(text).split("<|image_pad|>")
        assert ids == enc(tok, before) + [img] * n_img + enc(tok, after)  # no BOS: Qwen2 adds none
        assert tok.bos_token_id not in ids
        if text == USER_TEXT["llava"]:
            assert ids == QWEN_IDS  # pinned on the stand-in vocabulary (testing.make_tokenizer)


# ---- the shape stand-ins render what the real checkpoints render --------------------------------------------
def test_shape_processors_render_the_checkpoint_prompts():
    from vlmguard.models import shapes

    for name, cls, expected in (("llava-1.5-7b-cpu", LlavaAdapter, vicuna_reference),
                                ("llava-next-7b-cpu", LlavaNextAdapter, vicuna_reference),
                                ("qwen2-vl-7b-cpu", Qwen2VLAdapter, qwen_reference)):
        proc = shapes.build_processor(name)
        a = cls.__new__(cls)
        a.processor, a.tokenizer = proc, proc.tokenizer
        text = USER_TEXT["llava"]
        assert a.format_prompt(Prompt(text=text, images=[random_image(0)])) == expected(text), name
        ids = proc.tokenizer(expected(text))["input_ids"]
        if cls is Qwen2VLAdapter:
            assert proc.tokenizer.bos_token_id not in ids  # the real Qwen2 tokenizer adds no BOS
        else:
            assert ids[0] == proc.tokenizer.bos_token_id and ids.count(proc.tokenizer.bos_token_id) == 1


def test_opera_and_halc_frame_llava15_with_their_own_string(tmp_path):
    """OPERA's and HALC's code send LLaVA-1.5 the vicuna_v1 system text straight followed by "USER: <image> {q}
    ASSISTANT:" (shikiw/OPERA pope_eval.py INSTRUCTION_TEMPLATE["llava-1.5"], eval_configs/llava-1.5_eval.yaml
    system_message), not the chat template's "... USER: <image>\\n{q} ASSISTANT:". The presets now send that string
    as a raw prompt on a LLaVA model under llava-hf's Vicuna template, and the run records it."""
    from vlmguard.bench.runner import _pope_items
    from vlmguard.synth.processor import CHAT_TEMPLATE

    opera = f"{SYSTEM}USER: <image> {Q} ASSISTANT:"
    hf = llava_adapter(HF_VICUNA)
    for name in ("opera", "halc"):
        assert get_pope_prompt(name).frame(Q, hf) == (opera, True)
        ids = hf.encode([Prompt(text=opera, images=[random_image(0)], raw=True)]).input_ids[0].tolist()
        image = hf.config.image_token_id
        first = ids.index(image)
        assert ids[0] == hf.tokenizer.bos_token_id and ids.count(hf.tokenizer.bos_token_id) == 1
        assert ids[1:first] == enc(hf.tokenizer, f"{SYSTEM}USER: ")
        assert ids[len(ids) - ids[::-1].index(image):] == enc(hf.tokenizer, f" {Q} ASSISTANT:")
    # every other preset, and these two on other templates (the bundled model's own, Qwen2-VL), keep the template
    assert get_pope_prompt("llava").frame(USER_TEXT["llava"], hf) == (USER_TEXT["llava"], False)
    assert get_pope_prompt("opera").frame(Q, llava_adapter(CHAT_TEMPLATE)) == (Q, False)
    assert get_pope_prompt("opera").frame(Q, qwen_adapter()) == (Q, False)
    assert get_pope_prompt("opera").frame(Q, None) == (Q, False)

    class Dataset:  # two questions of one image: what _pope_items reads of a dataset
        def pope_file(self, split):
            return SimpleNamespace(questions=[SimpleNamespace(question_id=i, image="a.jpg", text=Q, label="yes")
                                              for i in (1, 2)], path=tmp_path / "coco_pope_random.json", sha256="x")

        def image_path(self, name):
            return tmp_path / name

    items, knobs = _pope_items(Dataset(), "random", "opera", None, hf)
    assert [(it.prompt, it.raw) for it in items] == [(opera, True)] * 2
    assert knobs["prompt"] == f"{SYSTEM}USER: <image> {{question}} ASSISTANT:"
    items, knobs = _pope_items(Dataset(), "random", "opera", None, llava_adapter(CHAT_TEMPLATE))
    assert [(it.prompt, it.raw) for it in items] == [(Q, False)] * 2 and knobs["prompt"] == ""
