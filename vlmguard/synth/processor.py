"""The tiny model's word-level tokenizer and its LlavaProcessor (CLIP image processor at 96 px).

The tokenizer is trained with the ``tokenizers`` library on the synthetic corpus: a word-level vocabulary
(whitespace + punctuation pre-tokenizer, case kept so "Yes"/"No" are single tokens), ``<s>`` prepended,
and a WordPiece-style decoder whose clean-up joins punctuation back ("a cup ." -> "a cup.").
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmguard.synth.text import CAPTION_PROMPTS, DETAIL_PROMPTS, POPE_SUFFIX
from vlmguard.synth.world import CATEGORIES, SCENE_TYPES

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE]

# LLaVA-1.5-like template: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>" (optional system line first)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def base_corpus() -> list[str]:
    """Texts every vocabulary must cover regardless of the data: template words, prompts, names."""
    out = ["USER: ASSISTANT: Yes No", POPE_SUFFIX, *CAPTION_PROMPTS, *DETAIL_PROMPTS,
           "Is there a an in the image?", "A chat between a curious user and an artificial intelligence "
           "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."]
    out += [c.name for c in CATEGORIES] + [s.name for s in SCENE_TYPES]
    return out


def train_tokenizer(texts: Iterable[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(list(base_corpus()) + list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos_id)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                 pad_token=PAD, extra_special_tokens={"image_token": IMAGE},
                                 model_max_length=model_max_length, padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def image_processor(size: int = 96) -> CLIPImageProcessorPil:
    """The CLIP preprocessing the bundled model was trained with: transformers' PIL backend, whether or not
    torchvision is installed (its backend, transformers' default where present, resizes differently)."""
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def build_processor(tok: Tokenizer, image_size: int = 96, patch_size: int = 8) -> LlavaProcessor:
    return LlavaProcessor(image_processor=image_processor(image_size), tokenizer=wrap_tokenizer(tok),
                          patch_size=patch_size, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE, num_additional_image_tokens=1)
