"""Write a PNG contact sheet of oracle episodes: what the robot sees, step by step.

`python -m envs.contact_sheet --out contact_sheet.png` runs one oracle episode
per task and lays out the scene-camera frame before every skill, captioned
with the skill that was chosen; each row is headed by its instruction.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs import ENV_IDS, make_skill_env
from envs.oracle import OraclePolicy
from envs.rollout import EpisodeResult, run_episode

PAD = 8
HEADER = 26
CAPTION_LINES = 3


def render_sheet(logs: list[tuple[str, EpisodeResult]], tile: int, max_cols: int) -> Image.Image:
    """Rows of frames with captions; pure drawing, no simulation."""
    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=15)
    caption_h = 14 * CAPTION_LINES + 4
    cols = min(max_cols, max(len(log.frames) for _, log in logs))
    row_h = HEADER + tile + caption_h + PAD
    sheet = Image.new("RGB", (PAD + cols * (tile + PAD), PAD + len(logs) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (env_id, log) in enumerate(logs):
        top = PAD + row * row_h
        verdict = "success" if log.success else "FAILED"
        draw.text(
            (PAD, top + 4),
            f"{env_id} seed {log.seed}: {log.instruction}  [{verdict}]",
            fill="black",
            font=title_font,
        )
        steps = _pick_frames(len(log.frames), cols)
        for col, index in enumerate(steps):
            left = PAD + col * (tile + PAD)
            frame = Image.fromarray(log.frames[index]).resize((tile, tile))
            sheet.paste(frame, (left, top + HEADER))
            caption = f"{index + 1}. {log.skills[index]}" if index < len(log.skills) else "final"
            lines = textwrap.wrap(caption, width=max(8, tile // 7))[:CAPTION_LINES]
            draw.multiline_text(
                (left, top + HEADER + tile + 2),
                "\n".join(lines),
                fill="black",
                font=font,
                spacing=2,
            )
    return sheet


def _pick_frames(n: int, cols: int) -> list[int]:
    """Evenly spaced frame indices, always keeping the first and the final frame."""
    if n <= cols:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, cols).round().astype(int).tolist()))


def write_png(image: Image.Image, path: Path) -> None:
    """Atomic write: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("contact_sheet.png"))
    parser.add_argument(
        "--env",
        action="append",
        choices=sorted(ENV_IDS),
        help="env id (repeatable; default: every task)",
    )
    parser.add_argument("--episodes", type=int, default=1, help="episodes per env")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--size", type=int, default=224, help="rendered image size")
    parser.add_argument("--tile", type=int, default=160, help="tile size on the sheet")
    parser.add_argument("--max-cols", type=int, default=8)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    jobs = [
        (env_id, args.seed + k)
        for env_id in args.env or list(ENV_IDS)
        for k in range(args.episodes)
    ]
    logs = []
    for env_id, seed in tqdm(jobs, desc="episodes", file=sys.stderr):
        env = make_skill_env(env_id, image_size=args.size)
        logs.append((env_id, run_episode(env, OraclePolicy(), seed, keep_frames=True)))
        env.close()
    write_png(render_sheet(logs, args.tile, args.max_cols), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
