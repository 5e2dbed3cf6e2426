"""The ComfyUI bridge: LoRA files, the on-the-fly engine, hooks and graph replay; imports core only."""
