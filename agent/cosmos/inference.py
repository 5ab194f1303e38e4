"""A loaded Cosmos-Reason model: observations to prompts, prompts to completions.

One class, `CosmosModel`, for everything that runs the model: the `cosmos`
backend decides with it, the post-trainer (`trainer.cosmos`) validates by
generating with it and samples GRPO's completions with it, so serving and
training see the same prompt (`agent.cosmos.reasoning.PromptSpec`), the same
processor call and the same decoding.

On CUDA: bf16 weights, a static KV cache and `generate`'s automatic
`torch.compile` (batch sizes and prompt lengths are bucketed so few shapes get
compiled). On CPU: float32, dynamic cache, eager.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.cosmos.reasoning import PromptSpec, build_messages, style_for_model_type


@dataclass
class Prompt:
    """One chat prompt as text, with the pixels its media placeholders stand for."""

    text: str
    images: list[np.ndarray] = field(default_factory=list)
    video: np.ndarray | None = None  # T x H x W x 3


@dataclass
class Generation:
    """What one `generate` call produced, and what it cost."""

    texts: list[str]
    tokens: list[list[int]]  # each completion's token ids, up to and with its end token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


MEDIA_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class CosmosModel:
    """A Cosmos-Reason1 (Qwen2.5-VL) or Cosmos-Reason2 (Qwen3-VL) model with its processor."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        spec: PromptSpec | None = None,
        *,
        compiled: bool = False,
        fps: float = 4.0,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_type = model.config.model_type
        self.spec = spec or PromptSpec(style_for_model_type(self.model_type))
        self.compiled = compiled
        self.fps = fps
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        # Vision placeholders are the processor's to place: a completion holding one (a
        # sampled one can) would be answered with image features nobody sent.
        vocab = self.tokenizer.get_vocab()
        self.media_ids = sorted(vocab[t] for t in MEDIA_TOKENS if t in vocab)
        # Fills a compiled batch up to its bucket: text only, so padding rows cost no
        # image preprocessing or vision-tower work; their answers are dropped.
        self._filler = self.prompt("", ["wait"], None, None)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @classmethod
    def load(
        cls,
        path: str,
        *,
        spec: PromptSpec | None = None,
        device: str = "",
        dtype: str = "",
        compile: str = "auto",
        fps: float = 4.0,
    ) -> CosmosModel:
        """`from_pretrained` a checkpoint (hub id or directory) with the classes its config names.

        device defaults to cuda where available, dtype to bf16 there and float32
        on the CPU; compile "auto" compiles on CUDA only.
        """
        import torch

        from agent.cosmos.loading import load_model, load_processor, model_type_of

        model_type = model_type_of(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        processor = load_processor(path, model_type)
        model = load_model(path, model_type, getattr(torch, dtype), device)
        compiled = compile == "on" or (compile == "auto" and device.startswith("cuda"))
        return cls(model, processor, spec, compiled=compiled, fps=fps)

    # ------------------------------------------------------------------ prompts

    def prompt(
        self,
        instruction: str,
        options: Sequence[str],
        history: Sequence[str] | None,
        image: np.ndarray | None,
        frames: Sequence[np.ndarray] = (),
    ) -> Prompt:
        """The prompt of one decision: the question of `self.spec`, then the image, or the
        episode's last `frames` as a short video when there are several (none for a
        text-only spec)."""
        question = self.spec.question(instruction, options, history)
        if image is None or not self.spec.image:
            media, images, video = [], [], None
        elif len(frames) > 1:
            media, images, video = ["video"], [], np.stack(list(frames))
        else:
            media, images, video = ["image"], [image], None
        messages = build_messages(self.spec.style, question, media)
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return Prompt(text, images, video)

    def encode(self, prompts: Sequence[Prompt]) -> Any:
        """The processor's tensors for `prompts`, left-padded for generation, on the model's device."""
        images = [image for p in prompts for image in p.images] or None
        videos = [p.video for p in prompts if p.video is not None] or None
        extra: dict[str, Any] = {}
        if videos is not None:
            from transformers.video_utils import VideoMetadata

            extra["video_metadata"] = [
                VideoMetadata(
                    total_num_frames=len(v), fps=self.fps, frames_indices=list(range(len(v)))
                )
                for v in videos
            ]
            extra["do_sample_frames"] = False
        if self.compiled:
            extra["pad_to_multiple_of"] = 64
        inputs = self.processor(
            text=[p.text for p in prompts],
            images=images,
            videos=videos,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            **extra,
        )
        return inputs.to(self.device)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        seed: int | None = None,
    ) -> Generation:
        """One left-padded `generate` over `prompts` (greedy when temperature is 0)."""
        import torch

        n = len(prompts)
        prompts = list(prompts)
        if self.compiled:  # few distinct shapes -> few compilations
            prompts += [self._filler] * (_bucket(n) - n)
        inputs = self.encode(prompts)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            suppress_tokens=self.media_ids or None,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.compiled:
            kwargs["cache_implementation"] = "static"
        if min_new_tokens:
            kwargs["min_new_tokens"] = min(min_new_tokens, max_new_tokens)
        if seed is not None:
            torch.manual_seed(seed)
        on_cuda = self.device.startswith("cuda")
        clock = _FirstTokenClock(on_cuda)
        prompt_len = inputs["input_ids"].shape[1]
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs, logits_processor=[clock])
        if on_cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        new = output[:n, prompt_len:].tolist()
        tokens = [_until_end(row, self.end_id) for row in new]
        texts = self.processor.batch_decode(
            [row or [self.end_id] for row in tokens], skip_special_tokens=True
        )
        first = clock.first or end
        steps = max(0, len(new[0]) - 1) if new else 0
        return Generation(texts, tokens, first - start, end - first, steps)

    def warm_up(self, size: int = 448) -> None:
        """One short generation so the first robot does not pay for allocation/compilation."""
        blank = np.zeros((size, size, 3), np.uint8)
        self.generate([self.prompt("warm up", ["wait"], [], blank)], max_new_tokens=4)


def _until_end(tokens: list[int], end_id: int) -> list[int]:
    """A completion's tokens up to and including its first end token (padding after it dropped)."""
    return tokens[: tokens.index(end_id) + 1] if end_id in tokens else tokens


class _FirstTokenClock:
    """Logits hook, called once per generated token: its first call marks the end of prefill."""

    def __init__(self, sync_cuda: bool) -> None:
        self.sync_cuda = sync_cuda
        self.first: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            if self.sync_cuda:
                import torch

                torch.cuda.synchronize()
            self.first = time.perf_counter()
        return scores


def _bucket(n: int) -> int:
    """Next power of two: the batch sizes a compiled decoder is specialised for."""
    return 1 << max(0, (n - 1).bit_length())
