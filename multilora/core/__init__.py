"""Pure maths of the pack: torch and the standard library only, importable without ComfyUI."""
