"""Token positions of CLoRA's concept words, from the tokenizer's own output (Meral et al. 2024, §3).

CLoRA contrasts the cross-attention maps of the concept tokens, so it needs the index of every token of
a concept word in the prompt's conditioning. The positions come from the tokenizer, never from
hand-counted indices (the authors' notebook has wrong ones): the word is tokenized alone and its ids are
subsequence-matched in the prompt's ids.

ComfyUI's ``clip.tokenize(text)`` returns ``{"l": rows}`` (SDXL adds ``"g"`` with the same positions);
each row is a list of 77 entries ``(token_id, weight)`` or ``(token_id, weight, word_id)``:
BOS (49406), up to 75 content tokens, EOS (49407), then padding (EOS for CLIP-L, id 0 for CLIP-G).
Rows are concatenated along the token axis, so entry p of row r has global index
    g(r, p) = Σ_{r' < r} len(row_r') + p = 77·r + p.
Content tokens are the entries after BOS up to the row's first EOS; matching runs over the stream of
content tokens of all rows in order, so a word that ComfyUI splits over a row boundary (it cuts a
weighted segment of ≥ 8 tokens anywhere) is still found, with positions in both rows. Entries that are
not integer ids (textual-inversion embedding vectors) never match and break contiguity.

Prompt variants: ``decorate_prompt`` inserts a LoRA's trigger word(s) before every whole-word occurrence
of its concept word, inside ComfyUI's weight syntax ("(cat:1.2)" → "(sks cat:1.2)"), keeping the
prompt's case. A word is a run of letters and digits (CLIP's pre-tokenizer splits at "_", "-" and
punctuation too), so "cat" does not match "category" or "cats". Occurrences already preceded by the
trigger, occurrences that are the end of the trigger itself (trigger == concept word: "a zorb", never
"a zorb zorb") and names inside ``embedding:name`` are left alone (decorating twice changes nothing); an
empty trigger returns the prompt unchanged.
Pure module: no ComfyUI imports.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

from ..core.errors import ConceptNotFoundError, MultiLoRAError

BOS_ID = 49406
EOS_ID = 49407
EMBEDDING_IDENTIFIER = "embedding:"

TokenizeFn = Callable[[str], Any]
Rows = Sequence[Sequence[Sequence[Any]]]

# A word character for whole-word matching is a letter or a digit: CLIP's pre-tokenizer splits on
# everything else ("cat_dog" → cat, _, dog), so "_" and "-" end a word here too.
_BEFORE = r"(?<![^\W_])"
_AFTER = r"(?![^\W_])"


def concept_not_found(word: str, prompt: str, node: str = "CLoRA") -> ConceptNotFoundError:
    """The pack's error for a concept word that is absent from a prompt."""
    return ConceptNotFoundError(
        f"{node}: concept word '{word}' is not in the prompt '{prompt}'. Use a word that appears in the prompt.")


def token_rows(tokens: Mapping[str, Rows] | Rows) -> Rows:
    """The rows of a tokenizer output: ``tokens["l"]`` (else ``"g"``, else the only key) or the rows themselves."""
    if isinstance(tokens, Mapping):
        for key in ("l", "g"):
            if key in tokens:
                return tokens[key]
        if len(tokens) == 1:
            return next(iter(tokens.values()))
        raise ValueError(f"CLoRA: cannot pick token rows from tokenizer output with keys {sorted(tokens)}.")
    return tokens


def _token_id(entry: Any) -> int | None:
    """The integer id of one row entry, None for an embedding vector or anything else."""
    token = entry[0] if isinstance(entry, (tuple, list)) else entry
    if isinstance(token, bool):
        return None
    if isinstance(token, int):
        return token
    try:
        return int(token.__index__())  # numpy / 0-d integer tensors
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None


def content_tokens(rows: Rows, bos: int = BOS_ID, eos: int = EOS_ID) -> list[tuple[int, int | None]]:
    """(global index, id) of every content token: after each row's BOS, before its first EOS."""
    stream: list[tuple[int, int | None]] = []
    offset = 0
    for row in rows:
        ids = [_token_id(e) for e in row]
        start = 1 if ids and ids[0] == bos else 0
        for p in range(start, len(ids)):
            if ids[p] == eos:
                break
            stream.append((offset + p, ids[p]))
        offset += len(row)
    return stream


def word_token_ids(tokenize_fn: TokenizeFn, word: str, bos: int = BOS_ID, eos: int = EOS_ID) -> list[int]:
    """Ids of ``word`` tokenized alone by the same tokenizer, without BOS, EOS and padding."""
    return [t for _, t in content_tokens(token_rows(tokenize_fn(word)), bos, eos) if t is not None]


def find_occurrences(rows: Rows, ids: Sequence[int], bos: int = BOS_ID, eos: int = EOS_ID) -> list[list[int]]:
    """Global indices of each contiguous occurrence of ``ids`` among the content tokens, in order."""
    target = [int(t) for t in ids]
    if not target:
        return []
    stream = content_tokens(rows, bos, eos)
    n = len(target)
    found: list[list[int]] = []
    for k in range(len(stream) - n + 1):
        if all(stream[k + j][1] == target[j] for j in range(n)):
            found.append([stream[k + j][0] for j in range(n)])
    return found


def find_positions(rows: Rows, ids: Sequence[int], bos: int = BOS_ID, eos: int = EOS_ID) -> list[int]:
    """Sorted global indices of every token of every occurrence of ``ids`` ([] when absent)."""
    return sorted({p for occurrence in find_occurrences(rows, ids, bos, eos) for p in occurrence})


def concept_positions(tokenize_fn: TokenizeFn, prompt: str, words: Sequence[str],
                      bos: int = BOS_ID, eos: int = EOS_ID, node: str = "CLoRA") -> dict[str, list[int]]:
    """Token positions of each word in ``prompt``; ConceptNotFoundError names ``node`` and the first absent word."""
    rows = token_rows(tokenize_fn(prompt))
    positions: dict[str, list[int]] = {}
    for word in words:
        found = find_positions(rows, word_token_ids(tokenize_fn, word, bos, eos), bos, eos)
        if not found:
            raise concept_not_found(word, prompt, node)
        positions[word] = found
    return positions


def bpe_concept_positions(prompt_rows: Rows, tokenize_word: TokenizeFn, prompt: str, words: Sequence[str],
                          node: str = "CLoRA") -> dict[str, list[int]]:
    """Token positions of each word in a byte-level BPE prompt (Qwen, GPT-2 style: no BOS / EOS, a word's tokens
    depend on the space before it and its case). Each word is looked up as " word" and "word", as written, lower
    case and capitalised; ``tokenize_word`` tokenizes a fragment without any chat template. ConceptNotFoundError
    names ``node`` and the first absent word."""
    positions: dict[str, list[int]] = {}
    for word in words:
        found: set[int] = set()
        for form in dict.fromkeys((word, word.lower(), word.capitalize())):
            for text in (" " + form, form):
                found.update(find_positions(prompt_rows, word_token_ids(tokenize_word, text, -1, -1), -1, -1))
        if not found:
            raise concept_not_found(word, prompt, node)
        positions[word] = sorted(found)
    return positions


def _phrase_pattern(text: str) -> str:
    """Regex for ``text`` as whole words, any run of whitespace between its words."""
    return _BEFORE + r"\s+".join(re.escape(w) for w in text.split()) + _AFTER


def _in_embedding_name(prompt: str, start: int) -> bool:
    """Whether position ``start`` lies inside an ``embedding:name`` reference."""
    chunk_start = max(prompt.rfind(" ", 0, start), prompt.rfind("\n", 0, start)) + 1
    return EMBEDDING_IDENTIFIER in prompt[chunk_start:start]


def decorate_prompt(prompt: str, concept: str, trigger: str | Sequence[str]) -> str:
    """CLoRA prompt variant: ``trigger`` inserted before every whole-word, case-insensitive ``concept``."""
    words = trigger.split() if isinstance(trigger, str) else [w for t in trigger for w in t.split()]
    trigger_text = " ".join(words)
    if not trigger_text:
        return prompt
    if not concept.strip():
        raise MultiLoRAError(
            f"CLoRA: trigger '{trigger_text}' needs a concept word to attach to. Set the LoRA's concept word.")
    # Already decorated: the trigger stands right before the concept word, or the concept word is the end of
    # the trigger itself (trigger == concept word, or a trigger phrase ending in it): nothing to insert.
    already = re.compile(_phrase_pattern(trigger_text) + r"\s+$", re.IGNORECASE)
    covered = re.compile(_phrase_pattern(trigger_text) + r"$", re.IGNORECASE)
    pieces: list[str] = []
    last = 0
    found = False
    for match in re.finditer(_phrase_pattern(concept), prompt, re.IGNORECASE):
        if _in_embedding_name(prompt, match.start()):
            continue
        found = True
        if already.search(prompt, 0, match.start()) or covered.search(prompt, 0, match.end()):
            continue
        pieces.append(prompt[last:match.start()])
        pieces.append(trigger_text + " ")
        last = match.start()
    if not found:
        raise concept_not_found(concept, prompt)
    pieces.append(prompt[last:])
    return "".join(pieces)
