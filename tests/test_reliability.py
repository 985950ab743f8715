"""Hostile inputs, interrupted work and untrusted files: each fails clearly or is skipped and reported."""

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dmdd.checkpoint import load_checkpoint, restore_model, save_checkpoint
from dmdd.cli import main
from dmdd.data import load_category, read_image
from dmdd.deploy.predict import Predictor, expand_inputs
from dmdd.errors import CheckpointError, ImageReadError
from dmdd.training.loop import fit


def test_truncated_jpeg_and_one_pixel_image(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: (corrupt or truncated|not a readable image).*Truncated"):
        read_image(tmp_path / "cut.jpg", 32)
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ImageReadError, match=r"dot\.png: image is 1x1 px, smaller than the minimum"):
        read_image(tmp_path / "dot.png", 32)


def _peak_rss_of(code: str) -> float:
    """Run code in a fresh interpreter; return its peak resident memory in MiB."""
    probe = code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_10000_pixel_image_is_reduced_early(tmp_path, suffix):
    path = tmp_path / f"huge{suffix}"
    Image.new("L", (10000, 10000), 90).save(path)
    baseline = _peak_rss_of("import dmdd.data.io")
    peak = _peak_rss_of(
        f"from dmdd.data.io import read_image; a = read_image({str(path)!r}, 256); assert a.shape == (256, 256, 3)"
    )
    # A full RGB decode would need 300 MB for the array alone (plus copies); grey decoding + early reduce stays small.
    assert peak - baseline < 250, f"reading used {peak - baseline:.0f} MiB"


def test_cmyk_jpeg_palette_and_rgba_load_as_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = read_image(tmp_path / "c.jpg")
    assert red.shape == (16, 16, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    Image.new("P", (16, 16)).save(tmp_path / "p.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert read_image(tmp_path / "p.png").shape == (16, 16, 3)
    assert read_image(tmp_path / "t.png").max() == 0  # transparent -> composited on black


def test_symlink_loop_and_non_ascii_names_in_a_data_folder(tmp_path):
    good = tmp_path / "cat/train/good"
    good.mkdir(parents=True)
    for name in ("défaut_ü.png", "缺陷.png", "plain.png"):
        Image.new("RGB", (16, 16), (1, 2, 3)).save(good / name)
    os.symlink(good / "loop.png", good / "loop.png")  # a link to itself
    os.symlink(good, good / "again")  # a folder loop
    records = load_category(tmp_path / "cat").train
    assert sorted(r.image.name for r in records) == sorted(["défaut_ü.png", "缺陷.png", "plain.png"])
    assert all(read_image(r.image, 16).shape == (16, 16, 3) for r in records)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM"]))
def test_decoder_fuzz_never_crashes_with_anything_but_the_documented_error(tmp_path, data, header):
    path = tmp_path / "fuzz.png"
    path.write_bytes(header + data)
    try:
        out = read_image(path, 16)
    except ImageReadError as exc:
        assert str(path) in str(exc)
    else:
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"config": {}, "model": {"w": torch.ones(3)}})
    before = target.read_bytes()

    def exploding_save(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last\.pt .*file write failed.* MiB free") as err:
        save_checkpoint(target, {"config": {}, "model": {"w": torch.zeros(3)}})
    assert "previous checkpoint there is untouched" in str(err.value)
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "last.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(3))


class _Planted:
    """Unpickling this runs a shell command that creates ``marker``: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tiny_tree, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    payload = {"format": "dmdd-checkpoint", "format_version": 1, "config": {}, "model": {"w": torch.zeros(2)},
               "note": _Planted(marker)}  # fmt: skip
    files = {"zip": tmp_path / "zip.pt", "legacy": tmp_path / "legacy.pt", "pickle": tmp_path / "plain.pt"}
    torch.save(payload, files["zip"])
    torch.save(payload, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(payload, protocol=2))
    for kind, path in files.items():  # each file really runs the command when unpickled without weights_only
        torch.load(path, weights_only=False) if kind != "pickle" else pickle.loads(path.read_bytes())
        assert marker.is_file(), kind
        marker.unlink()
    image = str(sorted((tiny_tree / "test/good").glob("*.png"))[0])
    for kind, path in files.items():
        with pytest.raises(CheckpointError, match="damaged or not a dmdd checkpoint"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="damaged or not a dmdd checkpoint"):
            restore_model(path)
        assert main(["predict", str(path), image, "--out", str(tmp_path / "pred")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dmdd: error: checkpoint") and "not a dmdd checkpoint" in err
        assert len(err.splitlines()) == 1
        assert not marker.exists(), kind
    run = tmp_path / "run"  # a planted last.pt in a run folder: --resume refuses it too
    run.mkdir()
    run.joinpath("last.pt").write_bytes(files["zip"].read_bytes())
    with pytest.raises(CheckpointError, match="damaged or not a dmdd checkpoint"):
        fit(tiny_config(tiny_tree), run, resume=True, progress=False)
    assert not marker.exists()


def _train_cmd(tree: Path, out: Path, epochs: int) -> list[str]:
    flags = ["--image-size", "64", "--epochs", str(epochs), "--batch-size", "1", "--no-progress", "--out", str(out)]
    return [sys.executable, "-m", "dmdd.cli", "train", "--data", str(tree), "--backbone", "efficientnet_lite0", *flags]


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a shell delivers them, whatever an earlier test left in this process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt_after_first_epoch(cmd: list[str], log: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the run, wait until its first epoch is logged (the checkpoint is written before the log line), then
    send ``sig``. The run is far too long to finish first, so the signal always lands mid-training."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no epoch was logged (exit {proc.returncode}): {err[-1500:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


EPOCHS_NEVER_REACHED = 1000  # ~0.7 s an epoch here: the signal arrives long before the end


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_training_leaves_a_usable_checkpoint_and_resume_matches(tiny_tree, tmp_path, sig):
    out = tmp_path / "interrupted"
    run = _interrupt_after_first_epoch(_train_cmd(tiny_tree, out, EPOCHS_NEVER_REACHED), out / "train_log.jsonl", sig)
    ignored = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("SigIgn")]
    assert run.returncode == 2, (run.returncode, run.stdout[-500:], run.stderr[-1500:], ignored)
    assert "training interrupted" in run.stderr and "--resume" in run.stderr and "Traceback" not in run.stderr
    done = load_checkpoint(out / "last.pt")["epoch"]
    assert 1 <= done < EPOCHS_NEVER_REACHED
    if sig != signal.SIGTERM:
        return
    # The learning rate does not depend on the planned length (constant schedule, no warm-up), so resuming with
    # one epoch more than was done must reach the weights of an uninterrupted run of that many epochs, bit for bit.
    epochs = done + 1
    resumed = subprocess.run([*_train_cmd(tiny_tree, out, epochs), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    straight = subprocess.run(_train_cmd(tiny_tree, tmp_path / "straight", epochs), capture_output=True, text=True)
    assert straight.returncode == 0
    a, b = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "straight/last.pt")
    assert a["epoch"] == b["epoch"] == epochs
    for k, v in b["model"].items():
        assert torch.equal(v, a["model"][k]), k


def test_predict_folder_of_200_with_5_bad_files_finishes(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "run", progress=False)
    folder = tmp_path / "line"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(195):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "195.png").write_bytes(b"")
    (folder / "196.png").write_bytes(b"plain text")
    (folder / "197.jpg").write_bytes((folder / "000.png").read_bytes()[:100])
    Image.new("RGB", (2, 2)).save(folder / "198.png")
    (folder / "199.png").write_bytes((folder / "001.png").read_bytes()[:-200])
    paths, problems = expand_inputs([str(folder)])
    assert len(paths) == 200 and not problems
    results, failures = Predictor(ckpt, "cpu").predict_files(paths, tmp_path / "out", batch_size=32)
    assert len(results) == 195
    assert sorted(Path(f["path"]).name for f in failures) == ["195.png", "196.png", "197.jpg", "198.png", "199.png"]
    summary = json.loads((tmp_path / "out/results.json").read_text())
    assert len(summary["images"]) == 195 and len(summary["failed"]) == 5
    assert len(list((tmp_path / "out/masks").iterdir())) == 195
