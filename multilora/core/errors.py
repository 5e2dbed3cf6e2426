"""Exception types raised by the pack; messages name the node, the input and the fix."""


class MultiLoRAError(ValueError):
    """Base class: a user-facing problem with a node's input."""


class InputError(MultiLoRAError):
    """A node input has the wrong type, is out of range or not finite, or names no known option."""


class StackError(MultiLoRAError):
    """A LoRA Stack row or a whole stack is unusable (missing file, empty name, nothing enabled)."""


class LoraFileError(MultiLoRAError):
    """A LoRA file cannot be read or matches nothing in the model."""


class UnsupportedAdapterError(MultiLoRAError):
    """A LoRA patches a layer type or in a way the on-the-fly engine cannot apply."""


class ConceptNotFoundError(MultiLoRAError):
    """A CLoRA concept word does not occur in the prompt it must be found in."""
