"""The mode switch, course.setup(), that importing the library changes no process state, and that
smoke mode never opens a network connection."""

import os
import subprocess
import sys

import pytest
import torch

from dpo_minimal.course import setup
from dpo_minimal.course.modes import get_mode


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


def test_smoke_setup_sets_hub_offline(monkeypatch):
    monkeypatch.setenv("DPO_COURSE_MODE", "smoke")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    threads = torch.get_num_threads()
    try:
        course = setup(verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert course.mode == "smoke" and course.smoke and course.device == "cpu"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


IMPORT_ONLY = """
import os, sys
# What the libraries it builds on do on import (torch sets TORCHINDUCTOR_CACHE_DIR) is theirs.
import datasets, peft, torch, transformers, tqdm
before = dict(os.environ)
import dpo_minimal, dpo_minimal.course, dpo_minimal.train, dpo_minimal.models
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
from huggingface_hub import constants
assert not constants.HF_HUB_OFFLINE
print("ok")
"""


@pytest.mark.parametrize("mode", ["", "smoke", "full"])
def test_import_changes_no_process_state(mode):
    # A practitioner on a CPU laptop imports the library and then calls load_model("gpt2"): the
    # import must not have cut the process off the Hub (it used to, with DPO_COURSE_MODE unset).
    env = {"PATH": "/usr/bin:/bin", **({"DPO_COURSE_MODE": mode} if mode else {})}
    out = subprocess.run([sys.executable, "-c", IMPORT_ONLY], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


BLOCKED = """
import socket
def refuse(*args, **kwargs):
    raise RuntimeError(f"network access attempted: {args}")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import dpo_minimal
from dpo_minimal.course import setup
assert setup(verbose=False).mode == "smoke"
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


def test_setup_silences_only_the_known_library_warnings(monkeypatch):
    import warnings

    monkeypatch.setenv("DPO_COURSE_MODE", "smoke")
    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:  # restores the filters afterwards
        warnings.simplefilter("always")
        try:
            setup(verbose=False)
        finally:
            torch.set_num_threads(threads)
        for message in ("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                        "`gradient_checkpointing` is deprecated and will be removed in v6."):
            warnings.warn(message, FutureWarning)
        assert caught == []
        # narrow: the same category with another message, or the same message as another
        # category, still shows
        warnings.warn("`use_cache` is deprecated", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning)
        assert [str(w.message) for w in caught] == ["`use_cache` is deprecated",
                                                    "`is_gradient_checkpointing` is deprecated"]
