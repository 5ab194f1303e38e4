"""Cosmos-Reason as a backend: multiple-choice next-action decisions with chain-of-thought.

One `decide` call turns every robot's observation into a prompt (scene image,
optionally the last few frames, the instruction and the current skill menu as
a multiple-choice question), runs ONE left-padded `generate` over the batch,
parses each completion, retries the unparseable ones with more tokens and a
slightly higher temperature (as the official benchmark does) and answers what
is still unparseable with a configurable fallback. Model output never raises.

On CUDA: bf16 weights, a static KV cache and `generate`'s automatic
`torch.compile` (batch sizes and prompt lengths are bucketed so few shapes get
compiled). On CPU: float32, dynamic cache, eager.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.backends.base import Backend, BackendError, BadObservation, EnvInfo
from agent.messages import Decision, Observation
from agent.reasoning import (
    STYLES,
    build_messages,
    format_question,
    parse_answer,
    style_for_model_type,
)

FALLBACKS = ("oracle", "first", "noop")
MAX_EPISODE_HISTORIES = 1024


@dataclass
class CosmosOptions:
    """Backend options (`--backend-opt KEY=VALUE` or keyword arguments; see `parse_options`)."""

    temperature: float = 0.6  # official sampling; 0 = greedy
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    max_new_tokens: int = 4096
    min_new_tokens: int = 0  # benchmarks: a fixed decode length (end of turn suppressed)
    retries: int = 2  # extra attempts for unparseable answers
    retry_token_factor: float = 2.0  # max_new_tokens grows by this per retry...
    max_retry_tokens: int = 8192  # ...up to this
    retry_temperature_step: float = 0.1  # temperature grows by this per retry
    fallback: str = "oracle"  # oracle (needs sim state, else first) | first | noop
    style: str = ""  # reason1 | reason2; default from the checkpoint's model_type
    camera: str = ""  # which image to show; default: the first one sent
    frames: int = 1  # >1: the last N frames of the episode as a short video
    fps: float = 4.0  # frame rate the video is presented at (Reason1 was trained at 4)
    points: bool = False  # also offer {"point_2d": [x, y]} answers (Reason2)
    max_batch: int = 64  # most observations per generate call
    device: str = ""  # default: cuda if available, else cpu
    dtype: str = ""  # default: bfloat16 on cuda, float32 on cpu
    compile: str = "auto"  # static cache + torch.compile: auto (cuda only) | on | off
    seed: int = -1  # >= 0: seed torch before each generate (reproducible sampling)

    def check(self) -> None:
        if self.fallback not in FALLBACKS:
            raise BackendError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.style and self.style not in STYLES:
            raise BackendError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.compile not in ("auto", "on", "off"):
            raise BackendError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.max_new_tokens < 1 or self.frames < 1 or self.max_batch < 1 or self.retries < 0:
            raise BackendError("max_new_tokens, frames and max_batch must be >= 1, retries >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise BackendError("temperature must be >= 0 and top_p in (0, 1]")
        if self.min_new_tokens < 0 or self.retry_token_factor < 1 or self.max_retry_tokens < 1:
            raise BackendError(
                "min_new_tokens must be >= 0, retry_token_factor >= 1, max_retry_tokens >= 1"
            )
        if not (self.repetition_penalty > 0 and self.fps > 0 and self.retry_temperature_step >= 0):
            raise BackendError(
                "repetition_penalty and fps must be > 0, retry_temperature_step >= 0"
            )


@dataclass
class _Prompt:
    text: str
    images: list[np.ndarray]
    video: np.ndarray | None  # T x H x W x 3


class CosmosBackend(Backend):
    """Cosmos-Reason1 (Qwen2.5-VL) or Cosmos-Reason2 (Qwen3-VL) behind `Backend.decide`."""

    name = "cosmos"
    Options = CosmosOptions

    def __init__(self, env: EnvInfo, model: str | None = None, **options: Any) -> None:
        super().__init__(env, model, **options)
        if not model:
            raise BackendError(
                "the cosmos backend needs --model: a hub id such as "
                "nvidia/Cosmos-Reason1-7B or a local checkpoint directory"
            )
        import torch

        from agent.backends.vlm_loading import load_model, load_processor, model_type_of

        opts: CosmosOptions = self.options
        try:
            model_type = model_type_of(model)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load Cosmos-Reason checkpoint {model!r}: {exc}") from exc
        device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = opts.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        _check_video(opts)
        try:
            processor = load_processor(model, model_type)
            loaded = load_model(model, model_type, getattr(torch, dtype), device)
        except (OSError, ValueError) as exc:  # missing weights, tokenizer or processor files
            raise BackendError(f"cannot load Cosmos-Reason checkpoint {model!r}: {exc}") from exc
        self._setup(loaded, processor, opts)

    @classmethod
    def from_loaded(
        cls, env: EnvInfo, model_id: str, model: Any, processor: Any, **options: Any
    ) -> CosmosBackend:
        """Wrap a model already in memory (benchmarks: random 7B-shaped weights on the GPU)."""
        self = cls.__new__(cls)
        Backend.__init__(self, env, model_id, **options)
        _check_video(self.options)
        self._setup(model.eval(), processor, self.options)
        return self

    def _setup(self, model: Any, processor: Any, opts: CosmosOptions) -> None:
        self.options = opts
        self.model_obj = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_type = model.config.model_type
        self.style = opts.style or style_for_model_type(self.model_type)
        self.device = str(model.device)
        self.compiled = opts.compile == "on" or (
            opts.compile == "auto" and self.device.startswith("cuda")
        )
        self._histories: OrderedDict[str, dict[int, np.ndarray]] = OrderedDict()
        # Fills a compiled batch up to its bucket: text only, so padding rows cost no
        # image preprocessing or vision-tower work; their answers are dropped.
        self._filler = self._prompt(Observation("", "", 0, options=["wait"]), remember=False)
        self._fallback_backend: Backend | None = None
        self._version = str(getattr(model.config, "_commit_hash", None) or "local")
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "decisions",
                "parsed",
                "point_answers",
                "retried",
                "fallbacks",
                "fallback_oracle",
                "fallback_first",
                "fallback_noop",
                "generate_calls",
                "generated_tokens",
                "prefill_s",
                "decode_s",
                "decode_steps",
                "batches",
                "max_batch_seen",
            ),
            0,
        )

    # ------------------------------------------------------------------ identity

    @property
    def model_version(self) -> str:
        return self._version

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        steps, calls = c["decode_steps"], c["generate_calls"]
        c["ms_per_decode_step"] = 1e3 * c["decode_s"] / steps if steps else None
        c["prefill_ms"] = 1e3 * c["prefill_s"] / calls if calls else None
        c.update(
            style=self.style, model_type=self.model_type, device=self.device, compiled=self.compiled
        )
        return c

    def warmup(self) -> None:
        """One short generation so the first robot does not pay for allocation/compilation."""
        blank = np.zeros((448, 448, 3), np.uint8)
        prompt = self._prompt(
            Observation("warmup", "warmup", 0, "warm up", {"image": blank}, options=["wait"]),
            remember=False,
        )
        self._generate([prompt], max_new_tokens=4, temperature=0.0)

    # ------------------------------------------------------------------ deciding

    def check(self, obs: Observation) -> None:
        try:
            self._pick_image(obs)
        except BackendError as exc:
            raise BadObservation(str(exc)) from None

    def decide(self, batch: Sequence[Observation]) -> list[Decision | BackendError]:
        self.counters["batches"] += 1
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(batch))
        decisions: list[Decision | None] = [None] * len(batch)
        askable = [i for i, obs in enumerate(batch) if obs.options or self._allow_point]
        prompts = {i: self._prompt(batch[i]) for i in askable}
        completions: dict[int, str] = {}
        pending = askable
        opts = self.options
        for attempt in range(opts.retries + 1):
            if not pending:
                break
            if attempt:
                self.counters["retried"] += len(pending)
            tokens = min(
                int(opts.max_new_tokens * opts.retry_token_factor**attempt),
                max(opts.max_new_tokens, opts.max_retry_tokens),
            )
            temperature = (
                opts.temperature + attempt * opts.retry_temperature_step
                if (opts.temperature > 0)
                else 0.0
            )
            texts = self._generate([prompts[i] for i in pending], tokens, temperature)
            still = []
            for i, text in zip(pending, texts, strict=True):
                completions[i] = text
                decision = self._to_decision(batch[i], text)
                if decision is None:
                    still.append(i)
                else:
                    decisions[i] = decision
            pending = still
        missing = [i for i, d in enumerate(decisions) if d is None]
        for i, decision in zip(
            missing,
            self._fall_back([batch[i] for i in missing], [completions.get(i) for i in missing]),
            strict=True,
        ):
            decisions[i] = decision
        self.counters["decisions"] += len(batch)
        return [d for d in decisions if d is not None]

    @property
    def _allow_point(self) -> bool:
        return self.options.points and self.style == "reason2"

    def _to_decision(self, obs: Observation, text: str) -> Decision | None:
        parsed = parse_answer(text, self.style, len(obs.options))  # type: ignore[arg-type]
        if parsed.point is not None and self._allow_point:
            self.counters["parsed"] += 1
            self.counters["point_answers"] += 1
            return Decision(point=parsed.point, reasoning=text.strip())
        if parsed.choice is not None:
            self.counters["parsed"] += 1
            return Decision(
                skill_index=parsed.choice, skill=obs.options[parsed.choice], reasoning=text.strip()
            )
        return None

    # ------------------------------------------------------------------ prompts

    def _prompt(self, obs: Observation, remember: bool = True) -> _Prompt:
        question = format_question(
            obs.instruction, list(obs.options), allow_point=self._allow_point
        )
        image = self._pick_image(obs)
        remember = remember and image is not None and self.options.frames > 1
        frames = self._frames(obs, image) if remember else []
        if image is None:
            media, images, video = [], [], None
        elif len(frames) > 1:
            media, images, video = ["video"], [], np.stack(frames)
        else:
            media, images, video = ["image"], [image], None
        messages = build_messages(self.style, question, media)  # type: ignore[arg-type]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return _Prompt(text=text, images=images, video=video)

    def _pick_image(self, obs: Observation) -> np.ndarray | None:
        if not obs.images:
            return None
        camera = self.options.camera
        if camera and camera not in obs.images:
            raise BackendError(f"camera {camera!r} not sent; robot sent {sorted(obs.images)}")
        image = obs.images[camera] if camera else next(iter(obs.images.values()))
        return np.ascontiguousarray(image, dtype=np.uint8)

    def _frames(self, obs: Observation, image: np.ndarray) -> list[np.ndarray]:
        """This episode's video up to `obs.step` (the number of remembered episodes is bounded)."""
        key = f"{obs.robot_id}/{obs.episode_id}"
        history, frames = remember_frame(
            self._histories.pop(key, {}), obs.step, image, self.options.frames
        )
        self._histories[key] = history
        while len(self._histories) > MAX_EPISODE_HISTORIES:
            self._histories.popitem(last=False)
        return frames

    # ------------------------------------------------------------------ generation

    def _generate(
        self, prompts: list[_Prompt], max_new_tokens: int, temperature: float
    ) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(prompts), self.options.max_batch):
            texts += self._generate_chunk(
                prompts[start : start + self.options.max_batch], max_new_tokens, temperature
            )
        return texts

    def _generate_chunk(
        self, prompts: list[_Prompt], max_new_tokens: int, temperature: float
    ) -> list[str]:
        import torch

        n = len(prompts)
        if self.compiled:  # few distinct shapes -> few compilations
            prompts = prompts + [self._filler] * (_bucket(n) - n)
        inputs = self._encode(prompts)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, repetition_penalty=self.options.repetition_penalty
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=self.options.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.compiled:
            kwargs["cache_implementation"] = "static"
        if self.options.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.options.min_new_tokens, max_new_tokens)
        if self.options.seed >= 0:
            torch.manual_seed(self.options.seed)
        on_cuda = self.device.startswith("cuda")
        clock = _FirstTokenClock(on_cuda)
        prompt_len = inputs["input_ids"].shape[1]
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.model_obj.generate(**inputs, **kwargs, logits_processor=[clock])
        if on_cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        new_tokens = output[:n, prompt_len:]
        first = clock.first or end
        c = self.counters
        c["generate_calls"] += 1
        c["prefill_s"] += first - start
        c["decode_s"] += end - first
        c["decode_steps"] += max(0, new_tokens.shape[1] - 1)
        pad = self.tokenizer.pad_token_id
        c["generated_tokens"] += (
            int((new_tokens != pad).sum()) if pad is not None else new_tokens.numel()
        )
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def _encode(self, prompts: list[_Prompt]) -> dict[str, Any]:
        images = [image for p in prompts for image in p.images] or None
        videos = [p.video for p in prompts if p.video is not None] or None
        extra: dict[str, Any] = {}
        if videos is not None:
            from transformers.video_utils import VideoMetadata

            extra["video_metadata"] = [
                VideoMetadata(
                    total_num_frames=len(v),
                    fps=self.options.fps,
                    frames_indices=list(range(len(v))),
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

    # ------------------------------------------------------------------ fallback

    def _fall_back(self, batch: list[Observation], texts: list[str | None]) -> list[Decision]:
        """Decisions for what the model could not answer (text None: nothing to ask)."""
        decisions = []
        for obs, text in zip(batch, texts, strict=True):
            note = (
                "[cosmos fallback: no options to choose from]"
                if text is None
                else f"[cosmos fallback: unparseable answer] {text.strip()[:2000]}".strip()
            )
            decision = self._oracle(obs) if self.options.fallback == "oracle" else None
            kind = "oracle"
            if decision is None:
                kind = "first" if obs.options and self.options.fallback != "noop" else "noop"
                decision = self._first_or_noop(obs, kind)
            decision.reasoning = f"{note}\n{decision.reasoning or ''}".strip()
            decision.decided_by = f"fallback:{kind}"
            self.counters["fallbacks"] += 1
            self.counters[f"fallback_{kind}"] += 1
            decisions.append(decision)
        return decisions

    def _oracle(self, obs: Observation) -> Decision | None:
        if obs.sim is None or not obs.options:
            return None
        if self._fallback_backend is None:
            from agent.backends import load_backend

            self._fallback_backend = load_backend("oracle", self.env)
        decision = self._fallback_backend.decide([obs])[0]
        return decision if isinstance(decision, Decision) else None

    def _first_or_noop(self, obs: Observation, kind: str) -> Decision:
        if kind == "first":
            return Decision(skill_index=0, skill=obs.options[0])
        if self.env.action_shape is not None:
            return Decision(action=np.zeros(self.env.action_shape, np.float32))
        return Decision()


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


def remember_frame(
    history: dict[int, np.ndarray], step: int, image: np.ndarray, n: int
) -> tuple[dict[int, np.ndarray], list[np.ndarray]]:
    """Add `step`'s image to an episode's frames: (the last `n` kept, the video up to `step`).

    Keyed by step, so a retried step replaces its frame instead of adding it twice.
    """
    history = {**history, step: image}
    kept = {s: history[s] for s in sorted(history)[-n:]}
    return kept, [frame for s, frame in kept.items() if s <= step]


def _check_video(opts: CosmosOptions) -> None:
    from agent.backends.vlm_loading import has_video_support

    if opts.frames > 1 and not has_video_support():
        raise BackendError(
            "frames > 1 sends video, which needs torchvision for the "
            "Qwen-VL video processor; install torchvision or use frames=1"
        )


def _bucket(n: int) -> int:
    """Next power of two: the batch sizes a compiled decoder is specialised for."""
    return 1 << max(0, (n - 1).bit_length())
