"""The training setup read from the checkpoint: training_args.bin without running it, the
sources of every setting, and the errors for a setting without one."""

from __future__ import annotations

import os

import pytest
import torch

from entropy_lab.config import read_training_args
from entropy_lab.errors import ConfigError

pytestmark = pytest.mark.cpu


class _Payload:
    """Unpickling this runs ``os.system(command)``: a planted training_args.bin."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_training_args_bin_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "training_args.bin"
    torch.save(_Payload(f"touch {marker}"), path)
    # The planted file is live: a plain unpickler would run it (checked in a subprocess).
    with pytest.raises(ConfigError, match=r"refused global (posix|os|nt)\.system") as info:
        read_training_args(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    import subprocess
    import sys

    live = "import pickle,zipfile,sys;z=zipfile.ZipFile(sys.argv[1]);"
    live += "pickle.loads(z.read([n for n in z.namelist() if n.endswith('data.pkl')][0]))"
    subprocess.run([sys.executable, "-c", live, str(path)], check=False)
    assert marker.exists()  # the same bytes do run code when unpickled plainly


def test_training_args_bin_nested_payload_is_refused(tmp_path):
    """A payload in a field of a genuine-looking GRPOConfig is refused too (plain pickle)."""
    import pickle
    import struct

    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()

    def text(value: bytes) -> bytes:
        return b"X" + struct.pack("<I", len(value)) + value

    head = b"\x80\x02ctrl.trainer.grpo_config\nGRPOConfig\n)\x81}" + text(b"reward_weights")
    call = f"c{os.system.__module__}\nsystem\n".encode() + text(command) + b"\x85R"
    path = tmp_path / "training_args.bin"
    path.write_bytes(head + call + b"sb.")
    with pytest.raises(ConfigError, match="refused global"):
        read_training_args(path)
    assert not marker.exists()
    # The same object with a plain value in that field reads as its fields.
    path.write_bytes(head + text(b"[1.0]") + b"sb.")
    assert read_training_args(path) == {
        "reward_weights": "[1.0]",
        "__class__": "trl.trainer.grpo_config.GRPOConfig",
    }
    assert pickle.loads(call + b".") == 0 and marker.exists()  # the call is live


@pytest.mark.parametrize(
    "value, message",
    [
        ({"loss_type": "dapo"}, "holds a dict, not a training-arguments object"),
        (torch.zeros(2), "refused"),
        ([1, 2], "holds a list"),
    ],
)
def test_training_args_bin_that_is_no_argument_object(tmp_path, value, message):
    path = tmp_path / "training_args.bin"
    torch.save(value, path)
    with pytest.raises(ConfigError, match=message):
        read_training_args(path)


def test_training_args_bin_damaged(tmp_path):
    path = tmp_path / "training_args.bin"
    path.write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(ConfigError, match="cannot be read as pickled training arguments"):
        read_training_args(path)
