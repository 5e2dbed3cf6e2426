"""Shared test set-up: keep the repo root off sys.path (its nodes/ would shadow ComfyUI's nodes.py)."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")

sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != REPO_ROOT]
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
