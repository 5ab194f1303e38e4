"""Cosmos-Reason post-training from the runtime's episodes: Physical-AI SFT and GRPO
(`python -m trainer.cosmos sft|grpo`; docs/cosmos.md)."""
