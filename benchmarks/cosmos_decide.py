"""Cosmos-Reason decisions per second: in-process and through the whole runtime.

    python benchmarks/cosmos_decide.py --tiny --json           # CPU, CI-sized (~1-2 min)
    python benchmarks/cosmos_decide.py --json                  # GPU, 7B-shaped random bf16
    python benchmarks/cosmos_decide.py --model nvidia/Cosmos-Reason1-7B --json

Every decision sends a 448x448 scene image, an instruction and a five-option
skill menu, and generates a fixed number of tokens (end of turn suppressed),
so runs are comparable whatever the weights say.

--tiny: a tiny random Qwen2.5-VL written with `save_pretrained` and loaded the
way a real checkpoint is; 16 robots through a real ZeroMQ server with
`--max-batch 1` versus `--max-batch 16` (goal: >= 4x decisions/s batched).

GPU mode: a Qwen2.5-VL-7B-shaped model with random bf16 weights (or real
weights from --model), static KV cache + torch.compile; for 1/8/32 robots it
reports prefill time, ms per decode step and decisions/s, in-process (the
backend alone) and through the runtime (server + clients).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.backends.base import EnvInfo
from agent.client import AgentClient
from agent.envspec import EnvDescription, ObservationSpec
from agent.messages import Observation
from agent.server import Server, ServerConfig

ENV = EnvInfo("tabletop/PickPlace-v0", action_shape=(4,), has_skills=True)
INSTRUCTION = "move the purple cube to the orange pad"
OPTIONS = [
    "move above the purple cube",
    "move above the orange cube",
    "move above the yellow cube",
    "grasp",
    "open the gripper",
]
IMAGE_SIZE = 448


def scene(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def observations(n: int) -> list[Observation]:
    return [
        Observation(
            f"robot{i}", f"episode{i}", 0, INSTRUCTION, {"image": scene(i)}, options=list(OPTIONS)
        )
        for i in range(n)
    ]


def backend_options(tokens: int) -> dict[str, Any]:
    """Greedy, fixed length, no retries: every decision costs the same."""
    return {
        "temperature": 0,
        "max_new_tokens": tokens,
        "min_new_tokens": tokens,
        "retries": 0,
        "fallback": "first",
    }


def delta(after: dict, before: dict) -> dict[str, float]:
    """Per-run figures from two snapshots of the backend's counters."""
    calls = after["generate_calls"] - before["generate_calls"]
    steps = after["decode_steps"] - before["decode_steps"]
    return {
        "prefill_ms": 1e3 * (after["prefill_s"] - before["prefill_s"]) / calls if calls else None,
        "ms_per_decode_step": 1e3 * (after["decode_s"] - before["decode_s"]) / steps
        if steps
        else None,
        "mean_batch": (after["decisions"] - before["decisions"]) / calls if calls else None,
    }


def drive_robots(endpoint: str, robots: int, seconds: float, results: Any) -> None:
    """Robots in their own process (as on a real fleet): one thread and socket each."""
    done, last, errors = [0] * robots, [0.0] * robots, []
    start = time.perf_counter()
    deadline = start + seconds

    def robot(i: int) -> None:
        image = scene(i)
        try:
            with AgentClient(endpoint, timeout_ms=600_000, robot_id=f"robot{i}") as client:
                while time.perf_counter() < deadline:
                    client.decide(
                        episode_id=f"episode{i}",
                        step=done[i],
                        images={"image": image},
                        instruction=INSTRUCTION,
                        options=OPTIONS,
                    )
                    done[i] += 1
                    last[i] = time.perf_counter()
        except Exception as exc:  # reported to the parent; a benchmark must not hang
            errors.append(repr(exc))

    threads = [threading.Thread(target=robot, args=(i,), daemon=True) for i in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"decisions": sum(done), "elapsed_s": max(last) - start, "errors": errors})


def through_runtime(backend, robots: int, max_batch: int, seconds: float) -> dict[str, Any]:
    """A real server on this process's backend, `robots` clients in another process."""
    import multiprocessing

    env = EnvDescription(ENV, ObservationSpec(), {"env_id": ENV.env_id})
    server = Server(backend, ServerConfig(bind="tcp://127.0.0.1:0", max_batch=max_batch), env)
    endpoint = server.bind()
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    before = backend.stats()
    fleet = context.Process(target=drive_robots, args=(endpoint, robots, seconds, results))
    fleet.start()
    try:
        outcome = results.get(timeout=seconds + 900)
    finally:
        fleet.join(60)
        server.stop()
        loop.join(60)
    if outcome["errors"]:
        raise RuntimeError(f"{len(outcome['errors'])} robot(s) failed: {outcome['errors'][0]}")
    return {
        "robots": robots,
        "max_batch": max_batch,
        "path": "runtime",
        "decisions": outcome["decisions"],
        "decisions_per_s": outcome["decisions"] / outcome["elapsed_s"],
        **delta(backend.stats(), before),
    }


def in_process(backend, robots: int, repeats: int = 2) -> dict[str, Any]:
    """The backend alone: one decide() over `robots` observations (after one warm call)."""
    batch = observations(robots)
    backend.decide(batch)  # compile / allocate for this shape
    before = backend.stats()
    start = time.perf_counter()
    for _ in range(repeats):
        backend.decide(batch)
    elapsed = time.perf_counter() - start
    return {
        "robots": robots,
        "max_batch": robots,
        "path": "in_process",
        "decisions_per_s": robots * repeats / elapsed,
        **delta(backend.stats(), before),
    }


def prompt_tokens(backend) -> dict[str, int]:
    obs = observations(1)[0]
    cosmos = backend.current.cosmos
    prompt = cosmos.prompt(obs.instruction, obs.options, obs.history, backend.pick_image(obs))
    ids = cosmos.encode([prompt])["input_ids"][0]
    image_id = cosmos.model.config.image_token_id
    return {"prompt_tokens": int(ids.numel()), "image_tokens": int((ids == image_id).sum())}


# ------------------------------------------------------------------ models


def tiny_backend(directory: Path, tokens: int):
    from agent.backends.cosmos import CosmosBackend
    from agent.cosmos.tiny import save_tiny_vlm

    save_tiny_vlm(directory, "qwen2_5_vl")
    return CosmosBackend(ENV, str(directory), device="cpu", **backend_options(tokens))


def random_7b_backend(tokens: int, device: str):
    """Qwen2.5-VL-7B's shapes (Cosmos-Reason1-7B) with random bf16 weights, built on the GPU."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from agent.backends.cosmos import CosmosBackend
    from agent.cosmos.loading import build_processor
    from agent.cosmos.tiny import (
        CHAT_TEMPLATE,
        SPECIAL_TOKENS,
        build_image_processor,
        build_tokenizer,
    )

    tokenizer = build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1e6,
            },
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
            window_size=112,
            patch_size=14,
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = build_image_processor("qwen2_5_vl", max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    processor = build_processor("qwen2_5_vl", image_processor, tokenizer, CHAT_TEMPLATE)
    return CosmosBackend.from_loaded(
        ENV, "random-qwen2.5-vl-7b-bf16", model, processor, **backend_options(tokens)
    )


def checkpoint_backend(path: str, tokens: int):
    from agent.backends.cosmos import CosmosBackend

    return CosmosBackend(ENV, path, **backend_options(tokens))


# ------------------------------------------------------------------ main


def run_tiny(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        backend = tiny_backend(Path(tmp) / "tiny-qwen2.5-vl", args.tokens)
        backend.warmup()
        robots = args.robots[0] if args.robots else 16
        rows = [
            through_runtime(backend, robots, 1, args.seconds),
            through_runtime(backend, robots, args.max_batch or robots, args.seconds),
        ]
        info = prompt_tokens(backend)
    return {
        "benchmark": "cosmos_decide",
        "mode": "tiny-cpu",
        "device": "cpu",
        "generated_tokens": args.tokens,
        **info,
        "rows": rows,
        "speedup_batched_vs_max_batch_1": rows[1]["decisions_per_s"] / rows[0]["decisions_per_s"],
        "goal_speedup": 4.0,
    }


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        raise SystemExit("GPU mode needs CUDA; use --tiny on CPU (or --device cpu, slow)")
    tokens = args.tokens
    if args.model:
        backend = checkpoint_backend(args.model, tokens)
    else:
        backend = random_7b_backend(tokens, args.device)
    backend.warmup()
    rows = []
    for robots in args.robots or [1, 8, 32]:
        rows.append(in_process(backend, robots))
        if backend.compiled:  # the runtime forms any batch size up to `robots`:
            for k in range((robots - 1).bit_length() + 1):  # compile each bucket first
                backend.decide(observations(1 << k))
        rows.append(through_runtime(backend, robots, args.max_batch or robots, args.seconds))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "benchmark": "cosmos_decide",
        "mode": "checkpoint" if args.model else "random-7b-bf16",
        "model": backend.model_id,
        "device": device,
        "compiled": backend.compiled,
        "generated_tokens": tokens,
        **prompt_tokens(backend),
        "rows": rows,
        "goals": {"ms_per_decode_step_1_robot": 6.0, "decisions_per_s_8_robots": 7.0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU (CI-sized)")
    parser.add_argument("--model", help="real checkpoint (hub id or directory) instead of random")
    parser.add_argument(
        "--robots", type=int, nargs="*", help="robot counts (tiny: 16; GPU: 1 8 32)"
    )
    parser.add_argument("--max-batch", type=int, help="server max batch (default: = robots)")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per decision")
    parser.add_argument("--seconds", type=float, default=12.0, help="runtime window per row")
    parser.add_argument("--device", default="cuda", help="GPU mode device")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run_tiny(args) if args.tiny else run_gpu(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result["rows"]:
            print(
                " ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
        extra = {k: v for k, v in result.items() if k != "rows"}
        print(json.dumps(extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
