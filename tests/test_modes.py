"""The mode switch, and that smoke mode never opens a network connection."""

import subprocess
import sys

import pytest

from dpo_minimal.modes import get_mode, setup_mode


def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv("DPO_COURSE_MODE", "full")
    assert get_mode() == "full"
    monkeypatch.setenv("DPO_COURSE_MODE", "SMOKE")
    assert get_mode() == "smoke"
    monkeypatch.setenv("DPO_COURSE_MODE", "fast")
    with pytest.raises(ValueError, match="not a mode"):
        get_mode()


def test_unset_means_full_only_with_cuda(monkeypatch):
    import torch

    monkeypatch.delenv("DPO_COURSE_MODE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_mode() == "smoke"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_mode() == "full"


def test_smoke_mode_sets_hub_offline(monkeypatch):
    monkeypatch.setenv("DPO_COURSE_MODE", "smoke")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert setup_mode() == "smoke"
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


BLOCKED = """
import socket
def refuse(*args, **kwargs):
    raise RuntimeError(f"network access attempted: {args}")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import dpo_minimal
assert dpo_minimal.MODE == "smoke"
model, tok = dpo_minimal.tiny_model("gpt2")
model, tok = dpo_minimal.tiny_model("phi")
data = dpo_minimal.load_preferences(dpo_minimal.shipped_data_path("train"))
conv = dpo_minimal.load_preferences(dpo_minimal.shipped_data_path("conversations"))
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE
print("ok", len(data), len(conv))
"""


def test_smoke_mode_opens_no_network_connection():
    # A fresh interpreter, so the sockets are blocked before anything is imported.
    env = {"DPO_COURSE_MODE": "smoke", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", BLOCKED], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_socket_blocking_is_real():
    # The guard above must be able to fail: the same patch makes a connection attempt raise.
    env = {"DPO_COURSE_MODE": "smoke", "PATH": "/usr/bin:/bin"}
    code = BLOCKED.split("import dpo_minimal")[0] + "socket.create_connection(('127.0.0.1', 9))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "network access attempted" in out.stderr
