"""Tiny Cosmos-Reason look-alikes, built here from a config (no download), small enough to
learn on a CPU.

`build_tiny_vlm("qwen2_5_vl" | "qwen3_vl", texts)` builds the real
architecture (Qwen2.5-VL for Reason1, Qwen3-VL for Reason2) from a small
config, with a byte-level BPE tokenizer trained here (`tokenizers`) on the
prompt templates and `texts` (the post-trainer passes the recorded
episodes' instructions, skills and rationales, so every word of the env is
one token), the real Qwen2-VL image processor and a Qwen-style chat
template. `save_tiny_vlm(dir, ...)` writes it the way `save_pretrained`
does, so it loads through the same `from_pretrained` path as
nvidia/Cosmos-Reason1-7B or Cosmos-Reason2-8B.

With `scripted_answer` the weights are set so that greedy *and* sampled
decoding emit exactly that text, then end the turn: every decoder layer's
output projection is zeroed, so the last hidden state is the current token's
embedding, and the embeddings/LM head form a chain "prompt end -> first answer
token -> ... -> <|im_end|>". It is still the real model and a real `generate`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cosmos.reasoning import (
    CHOICE_SUFFIX,
    HISTORY_PREFIX,
    POINT_HINT,
    REASON1_SYSTEM,
    REASON2_FORMAT,
    REASON2_SYSTEM,
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen-style: each turn "<|im_start|>role\n...<|im_end|>\n", media as vision placeholders.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# What every prompt says, whatever the env: a tokenizer built for episodes learns these words too.
TEMPLATES = [
    REASON1_SYSTEM,
    REASON2_SYSTEM,
    REASON2_FORMAT,
    CHOICE_SUFFIX,
    POINT_HINT,
    f"{HISTORY_PREFIX} none.",
    "The robot's task: What is the next action the robot should take?",
]
_CORPUS = [
    "You are a helpful assistant. Answer the question in the following format:",
    "<think> your reasoning </think> <answer> your answer </answer>",
    "The robot's task: pick up the red cube and place it on the green pad.",
    "What is the next action the robot should take? (A) (B) (C) (D) (E) (F)",
    "Answer with the option's letter from the given choices directly.",
    'Write your final answer immediately after the </think> tag. {"point_2d": [618, 347]}',
    "move the gripper above the blue block, open close push stack sort lift lower",
    "0123456789 ,.:;!?'\"()[]{}<>/_-+= abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]

# Patch geometry per architecture (Qwen2.5-VL: 14 px patches; Qwen3-VL: 16 px).
PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
IMAGE_NORM = {
    "qwen2_5_vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "qwen3_vl": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


@dataclass(frozen=True)
class TinySize:
    """How big a tiny look-alike is (docs/cosmos.md: which size learns best on a CPU)."""

    hidden: int = 128  # language model width
    layers: int = 2  # language model decoder layers
    vision: int = 64  # vision tower width (2 blocks)
    max_pixels: int = 112 * 112  # image processor budget: 112 px -> 16 image tokens


def build_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512):
    """A Qwen2 tokenizer with a byte-level BPE vocabulary trained on the prompt templates and
    `texts`: words seen often enough become single tokens; anything else still encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    bpe.train_from_iterator([*(_CORPUS * 4), *((TEMPLATES * 4) if texts else []), *texts], trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens(REASONING_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(model_type: str, max_pixels: int = 112 * 112):
    """The real Qwen2-VL image processor (PIL backend, no torchvision), small images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    patch = PATCH_SIZE[model_type]
    mean, std = IMAGE_NORM[model_type]
    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * patch) ** 2,
        max_pixels=max_pixels,
        image_mean=mean,
        image_std=std,
    )


def tiny_config(
    model_type: str, tokenizer: Any, hidden: int = 64, layers: int = 2, vision_width: int = 32
):
    """A small config of the real architecture, token ids matching `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    heads, head_dim = 4, hidden // 4
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    section[0] += head_dim // 2 - sum(section)
    vision = dict(
        depth=2,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=max(2, vision_width // 32),
        out_hidden_size=hidden,
        patch_size=PATCH_SIZE[model_type],
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if model_type == "qwen2_5_vl":
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": section,
            "rope_theta": 1e6,
        }
        vision.update(fullatt_block_indexes=[1], window_size=56)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if model_type == "qwen3_vl":
        text.update(head_dim=head_dim)
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": section,
            "mrope_interleaved": True,
            "rope_theta": 5e5,
        }
        vision.update(num_position_embeddings=256, deepstack_visual_indexes=[1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"unknown tiny model type {model_type!r}; use qwen2_5_vl or qwen3_vl")


def prompt_end_token(tokenizer: Any) -> int:
    """The last prompt token every generation starts from (end of the assistant header)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    return int(ids[-1])


def script_answer(model: Any, tokenizer: Any, answer: str) -> None:
    """Set weights so that decoding emits `answer` then <|im_end|>, whatever the input."""
    import torch

    chain = [prompt_end_token(tokenizer), *tokenizer(answer, add_special_tokens=False).input_ids]
    chain.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    hidden = model.config.text_config.hidden_size
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"scripted answer {answer!r} repeats a token; choose distinct words")
    if len(chain) - 1 > hidden:
        raise ValueError(f"scripted answer {answer!r} is longer than {hidden} tokens")
    text_model = model.model.language_model
    with torch.no_grad():
        for layer in text_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text_model.norm.weight.fill_(1.0)
        embeddings, head = model.get_input_embeddings().weight, model.lm_head.weight
        head.zero_()
        for k, (current, following) in enumerate(itertools.pairwise(chain)):
            embeddings[current].zero_()
            embeddings[current, k] = 1.0
            head[following, k] = 10.0


def build_tiny_vlm(
    model_type: str = "qwen2_5_vl",
    texts: Iterable[str] = (),
    size: TinySize = TinySize(),
    *,
    seed: int = 0,
) -> tuple[Any, Any]:
    """A random tiny look-alike in memory: (model, processor), tokenizer trained on `texts`."""
    import torch
    import transformers

    from agent.cosmos.loading import MODEL_CLASSES, build_processor

    if model_type not in MODEL_CLASSES:
        raise ValueError(f"unknown tiny model type {model_type!r}; use qwen2_5_vl or qwen3_vl")
    tokenizer = build_tokenizer(texts, vocab_size=2048 if texts else 512)
    config = tiny_config(model_type, tokenizer, size.hidden, size.layers, size.vision)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[model_type])(config).eval()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = build_image_processor(model_type, max_pixels=size.max_pixels)
    return model, build_processor(model_type, image_processor, tokenizer, CHAT_TEMPLATE)


def save_tiny_vlm(
    directory: str | Path,
    model_type: str = "qwen2_5_vl",
    *,
    scripted_answer: str | None = None,
    hidden: int = 64,
    layers: int = 2,
    max_pixels: int = 112 * 112,
    seed: int = 0,
) -> Path:
    """Write a tiny look-alike the way `save_pretrained` does (tests: scripted answers)."""
    from agent.cosmos.loading import save_vlm

    size = TinySize(hidden=hidden, layers=layers, vision=32, max_pixels=max_pixels)
    model, processor = build_tiny_vlm(model_type, size=size, seed=seed)
    if scripted_answer is not None:
        script_answer(model, processor.tokenizer, scripted_answer)
    save_vlm(directory, model, processor)
    return Path(directory)
