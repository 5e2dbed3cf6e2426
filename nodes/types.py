"""Custom socket types of the pack."""
from comfy_api.latest import io

LoraStackType = io.Custom("MULTILORA_STACK")
AttentionMapsType = io.Custom("MULTILORA_ATTENTION")
