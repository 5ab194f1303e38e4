"""Tiny random Cosmos-Reason look-alikes for tests and CPU benchmarks (no download).

`save_tiny_vlm(dir, "qwen2_5_vl" | "qwen3_vl")` writes a directory that loads
through the same `from_pretrained` path as nvidia/Cosmos-Reason1-7B or
Cosmos-Reason2-8B: a random Qwen2.5-VL / Qwen3-VL built from a small config, a
byte-level BPE tokenizer trained here with the `tokenizers` library, the real
Qwen2-VL image processor and a Qwen-style chat template.

With `scripted_answer` the weights are set so that greedy *and* sampled
decoding emit exactly that text, then end the turn: every decoder layer's
output projection is zeroed, so the last hidden state is the current token's
embedding, and the embeddings/LM head form a chain "prompt end -> first answer
token -> ... -> <|im_end|>". It is still the real model and a real `generate`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

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


def build_tokenizer(vocab_size: int = 512):
    """A Qwen2 tokenizer with a byte-level BPE vocabulary trained on a few sentences."""
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
    bpe.train_from_iterator(_CORPUS * 4, trainer)
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


def tiny_config(model_type: str, tokenizer: Any, hidden: int = 64, layers: int = 2):
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
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
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
    """Write model + tokenizer + processor files the way `save_pretrained` does."""
    import torch
    import transformers

    from agent.backends.vlm_loading import MODEL_CLASSES, PROCESSOR_CLASSES

    directory = Path(directory)
    tokenizer = build_tokenizer()
    config = tiny_config(model_type, tokenizer, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[model_type])(config).eval()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if scripted_answer is not None:
        script_answer(model, tokenizer, scripted_answer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor = build_image_processor(model_type, max_pixels=max_pixels)
    image_processor.save_pretrained(directory)
    # Real checkpoints name their processor class here; AutoProcessor reads it.
    config_file = directory / "preprocessor_config.json"
    saved = json.loads(config_file.read_text())
    saved["processor_class"] = PROCESSOR_CLASSES[model_type]
    config_file.write_text(json.dumps(saved, indent=2))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory
