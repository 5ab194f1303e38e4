"""Load a Cosmos-Reason checkpoint (hub id or local directory) with the right classes.

The model class comes from the checkpoint's config: ``qwen2_5_vl`` is
Cosmos-Reason1 (Qwen2.5-VL), ``qwen3_vl`` is Cosmos-Reason2 (Qwen3-VL).

transformers' Qwen-VL video processors need torchvision. Where torchvision is
missing (CPU-only machines here) the real processor class is built without
its video processor: images work exactly as usual, video input is refused
with a clear error.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

MODEL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
VIDEO_PROCESSOR_CLASSES = {
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
}


def model_type_of(path: str) -> str:
    """The checkpoint's ``model_type``, checked against the supported architectures."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; expected one of "
            f"{sorted(MODEL_CLASSES)} (Cosmos-Reason1 = qwen2_5_vl, Cosmos-Reason2 = qwen3_vl)"
        )
    return model_type


def has_video_support() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@functools.cache
def image_only_processor_class(model_type: str) -> type:
    """The real processor class, accepting a missing video processor."""
    import transformers

    base = getattr(transformers, PROCESSOR_CLASSES[model_type])

    def check_argument_for_proper_class(self, argument_name: str, argument: Any):
        if argument_name == "video_processor" and argument is None:
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        f"ImageOnly{base.__name__}",
        (base,),
        {"check_argument_for_proper_class": check_argument_for_proper_class},
    )


def build_processor(model_type: str, image_processor: Any, tokenizer: Any, chat_template: str):
    """A processor from parts: the real class, with video where torchvision allows."""
    import transformers

    if has_video_support():
        cls = getattr(transformers, PROCESSOR_CLASSES[model_type])
        video = getattr(transformers, VIDEO_PROCESSOR_CLASSES[model_type])(
            patch_size=image_processor.patch_size,
            merge_size=image_processor.merge_size,
            temporal_patch_size=image_processor.temporal_patch_size,
            size=dict(image_processor.size),
        )
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video,
            chat_template=chat_template,
        )
    cls = image_only_processor_class(model_type)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
    )


def load_processor(path: str, model_type: str):
    """AutoProcessor where possible; otherwise the same processor without video."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if has_video_support():
        return AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = tokenizer.chat_template or _saved_chat_template(path)
    if not template:
        raise ValueError(f"{path}: no chat template found (tokenizer or chat_template.jinja)")
    image_processor = AutoImageProcessor.from_pretrained(path)
    return build_processor(model_type, image_processor, tokenizer, template)


def _saved_chat_template(path: str) -> str | None:
    """Processors save the template beside the weights as .jinja or legacy .json."""
    import json

    jinja, legacy = Path(path) / "chat_template.jinja", Path(path) / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text()
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return None


def save_vlm(directory: str | Path, model: Any, processor: Any) -> None:
    """Write `model` and `processor` so that `load_model` and `load_processor` read them back:
    `save_pretrained` files, the processor class named for AutoProcessor, the chat template."""
    import json

    _quiet()
    directory = Path(directory)
    model.save_pretrained(directory)
    if has_video_support() and getattr(processor, "video_processor", None) is not None:
        processor.save_pretrained(directory)
        return
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    config_file = directory / "preprocessor_config.json"
    saved = json.loads(config_file.read_text())
    saved["processor_class"] = PROCESSOR_CLASSES[model.config.model_type]
    config_file.write_text(json.dumps(saved, indent=2))
    (directory / "chat_template.jinja").write_text(processor.chat_template)


def load_model(path: str, model_type: str, dtype: Any, device: str):
    """The model class named by the config, weights in `dtype` on `device`, eval mode."""
    import transformers

    _quiet()
    cls = getattr(transformers, MODEL_CLASSES[model_type])
    model = cls.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def _quiet() -> None:
    """No per-shard progress bars in servers' and trainers' logs (a version loads every reload)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
