"""Nothing untrusted runs code, and a Hub id that cannot be resolved costs seconds (issue 25, items 2, 4).

- A checkpoint's state.pt is read as data only (`weights_only=True`): a tampered one (a pickle that
  would write a marker file) is refused in one line naming the file, and the marker is never written.
- A model folder that asks to run its own code (`auto_map`) is refused in one line naming
  `trust_remote_code`, by `mmpr train` and by `mmpr build`'s preflight, before any folder is made.
- Online (`HF_HUB_OFFLINE=0`), a Hub id that cannot be resolved is refused by the preflight, saying
  whether the Hub cannot be reached or the id does not exist, before any folder is made.

Before: the pickle ran; transformers asked "Do you wish to run the custom code? [y/N]" mid-run; a
missing Hub id took 142 s and 337 lines, and left `runs/...` behind.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _run_fixture import make_run
from test_fail_safe import one_line_error

from mmpr_pipeline import cli, preflight
from mmpr_pipeline.train import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data_cards" / "train_mpo.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", n_shapes=4, n_scenes=2, n_shards=1)


def train_args(model, data, out, *sets):
    argv = ["train", str(TRAIN)]
    for s in (f"model={model}", f"data={data}", f"output_dir={out}", "max_steps=1", "progress_bar=false"):
        argv += ["--set", s]
    for s in sets:
        argv += ["--set", s]
    return argv


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class WritesAMarker:
    """Unpickling this opens (creates) a file: what a hostile state.pt would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_checkpoint_is_refused_and_never_run(tiny_model, run_dir, tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "marker"
    argv = train_args(tiny_model, run_dir, out)
    cfg = config_mod.load(TRAIN, cli._overrides(argv[2:][1::2]))
    ckpt = out / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(config_mod.to_json(cfg))  # the same config: it would resume
    torch.save({"step": 1, "trainable": {}, "payload": WritesAMarker(marker)}, ckpt / "state.pt")
    # The file is really hostile: an unsafe load runs it.
    torch.load(ckpt / "state.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{ckpt / 'state.pt'}: not a checkpoint this trainer can read as data" in line
    assert "nothing in it was run" in line
    assert not marker.exists()


@pytest.fixture
def remote_code_model(tiny_model, tmp_path):
    """A copy of the tiny model whose config asks for its own code, which would write a marker."""
    folder = tmp_path / "custom-code-model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom.EvilConfig",
        "AutoModelForImageTextToText": "custom.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w')\n")
    return folder


def test_a_model_folder_with_custom_code_is_refused_by_train(remote_code_model, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(train_args(remote_code_model, run_dir, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{remote_code_model}: config.json asks to run the model folder's own Python code" in line
    assert "auto_map: AutoConfig, AutoModelForImageTextToText" in line
    assert "`trust_remote_code: true`" in line and "--set trust_remote_code=true" in line
    assert not out.exists() and not (tmp_path / "marker").exists()


def test_a_model_folder_with_custom_code_is_refused_by_build(remote_code_model, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        cli.main(["build", "data_cards/demo.yaml", "--model", str(remote_code_model), "--out", str(run)]) == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --model: {remote_code_model}: config.json asks to run")
    assert "`trust_remote_code: true` in data_cards/demo.yaml" in line
    assert not run.exists() and not (tmp_path / "marker").exists()
    # Said so, the check lets it through (the engine then gets trust_remote_code=True).
    preflight.check_remote_code(str(remote_code_model), True, "--model", "trust_remote_code")


class _HubThatKnowsNoModel(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_without_the_model():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubThatKnowsNoModel)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_said_in_one_line_before_any_folder(tmp_path):
    run = tmp_path / "runs" / "x"
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "MMPR_"))}
    r = subprocess.run(
        [sys.executable, "-m", "mmpr_pipeline.cli", "build", "data_cards/demo.yaml"]
        + ["--model", "nosuchorg/nosuchmodel", "--out", str(run)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), **online, "MMPR_HUB_CHECK_TIMEOUT": "3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_error(
        r, 2, "--model: nosuchorg/nosuchmodel is not in the Hugging Face cache", "cannot be reached"
    )
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_that_does_not_exist_is_said_in_one_line(hub_without_the_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_without_the_model)
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_model("nosuchorg/nosuchmodel", "--model")
    assert str(e.value).startswith(
        f"--model: nosuchorg/nosuchmodel: no such model on the Hub ({hub_without_the_model})"
    )
