"""The pipeline against bad inputs: broken and odd images, bad parameters, no network, a pickle
payload as weights, and stages killed with SIGKILL part-way through.

Everything runs the real stage scripts or `dvc repro` as subprocesses in temp projects (see
pipeline_project.py), because what is tested is what a user sees: exit status, stderr, and the
files left behind.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import food10_photos
from PIL import Image
from pipeline_project import (
    ROOT,
    STAGES,
    apply_params,
    commit,
    copy_photos,
    env,
    make_project,
    ran,
    run,
)

from siamese_cv.config.cli import main as params_main
from siamese_cv.core.errors import run_cli

RED, BLUE = (255, 0, 0), (0, 0, 255)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The stage failed with status 2 and exactly one `error: ...` line on stderr, no traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


# --- broken and odd images through download + preprocess -----------------------------------


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR is patched to claim `width` x `height` (CRC fixed up)."""
    png = bytearray(_save(Image.new("RGB", (8, 8), RED), "PNG"))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return bytes(png)


def _broken_files(folder: Path, photo: bytes) -> dict[str, str]:
    """Write one file of each broken kind into `folder`; file name -> expected report reason."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png = _save(noise, "PNG")
    files = {
        "empty.jpg": (b"", "zero-byte file"),
        "cut.jpg": (photo[: len(photo) // 2], "truncated JPEG"),
        "cut.png": (png[: len(png) // 2], "truncated PNG"),
        "notes.jpg": (b"shopping list: flour, apples\n", "not an image (text)"),
        "error.png": (
            b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n",
            "not an image (HTML)",
        ),
        "bomb.png": (_bomb_png(30000, 30000), "decompression bomb: 9e+08 pixels > limit"),
        "dot.png": (_save(Image.new("RGB", (1, 1), RED), "PNG"), "1x1 px is too small"),
        "line.png": (_save(Image.new("L", (60000, 1)), "PNG"), "60000x1 px is too small"),
        "sliver.png": (_save(Image.new("RGB", (600, 4), RED), "PNG"), "aspect ratio over 50:1"),
    }
    expected = {}
    for name, (data, reason) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = reason
    os.symlink("loop.jpg", folder / "loop.jpg")  # a link to itself
    expected["loop.jpg"] = "symlink loop"
    os.mkfifo(folder / "pipe.jpg")  # a plain open() would block forever
    expected["pipe.jpg"] = "not a regular file"
    if not AS_ROOT:  # root reads mode-000 files regardless (tests/data covers it by monkeypatch)
        (folder / "locked.jpg").write_bytes(photo)
        (folder / "locked.jpg").chmod(0)
        expected["locked.jpg"] = "permission denied"
    return expected


def _odd_files(folder: Path, photo: bytes) -> dict[str, tuple[float, float, float] | None]:
    """Write the odd-but-valid kinds; file name -> mean RGB expected in the top half, if checked."""
    deep = Image.fromarray(np.full((32, 32), 128 * 257, dtype=np.uint16))  # mid grey in 16 bits
    cmyk = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    sticker = Image.new("P", (32, 32), 0)
    sticker.putpalette([*RED, *BLUE] + [0] * 762)
    sticker.paste(1, (0, 16, 32, 32))  # top half transparent (red underneath), bottom blue
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    phone = Image.new("RGB", (40, 20), RED)
    phone.paste(BLUE, (20, 0, 40, 20))  # left half red: on top once turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "deep.png": (_save(deep, "PNG"), (128, 128, 128)),  # clipped would be 255
        "print.jpg": (_save(cmyk, "JPEG", quality=95), (0, 255, 255)),
        "sticker.png": (_save(sticker, "PNG", transparency=0), (255, 255, 255)),
        "anim.gif": (
            _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
            RED,
        ),
        "anim.webp": (
            _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
            RED,
        ),
        "phone.jpg": (_save(phone, "JPEG", quality=95, exif=exif), RED),  # unrotated: half blue
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(photo)  # a Latin-1 name, not UTF-8
    return {name: colour for name, (_, colour) in files.items()} | {"caf\\xe9.jpg": None}


def _top_half_mean(jpeg: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)
    return pixels[: pixels.shape[0] // 2].reshape(-1, 3).mean(axis=0)


@pytest.mark.slow
def test_bad_images_are_skipped_with_reasons_and_odd_ones_kept(tmp_path: Path) -> None:
    photos = copy_photos(tmp_path / "photos", train=6, test=3, classes=3)
    folder = photos / "test" / "apple_pie"  # test is never sliced, so the counts below are exact
    photo = food10_photos("train", 7, classes=1)["apple_pie"][6].read_bytes()
    broken = _broken_files(folder, photo)
    odd = _odd_files(folder, photo)
    project = make_project(tmp_path / "project", photos)

    out = run(project, "dvc", "repro", "preprocess").stdout
    assert ran(out) == {"download", "preprocess"}, out
    kept = 27 + len(odd)
    summary = f"preprocess: kept {kept} images, skipped {len(broken)}"
    assert f"{summary} (reasons in metrics/data_report.json)" in out

    report = json.loads((project / "metrics/data_report.json").read_text())
    reasons = {item["id"]: item["reason"] for item in report["skipped"]["files"]}
    assert report["skipped"]["total"] == len(broken) and report["kept"]["total"] == kept
    assert set(reasons) == {f"test/apple_pie/{name}" for name in broken}
    for name, reason in broken.items():
        assert reason in reasons[f"test/apple_pie/{name}"], (
            name,
            reasons[f"test/apple_pie/{name}"],
        )
    assert {item["split"] for item in report["skipped"]["files"]} == {"test"}
    assert report["problems"] == [] and report["kept"]["test"] == 9 + len(odd)

    processed = {}
    for split in ("train", "validation", "test"):
        table = pq.read_table(project / f"data/processed/{split}.parquet")
        processed |= dict(
            zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
        )
    for name, colour in odd.items():
        image = processed[f"test/apple_pie/{name}"]
        assert Image.open(io.BytesIO(image)).size == (64, 64)
        if colour is not None:
            assert np.abs(_top_half_mean(image) - colour).max() < 20, (name, _top_half_mean(image))


# --- bad parameters: one line naming the key, before anything is written --------------------


def _params_dir(tmp_path: Path, section: str, key: str, value: object) -> Path:
    """A folder with stages/ and the committed params.yaml with `section.key` set to `value`."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


BAD_PARAMS = [
    ("data", "colour_mode", "rgb", "unknown key data.colour_mode; known keys of data: source"),
    ("preprocess", "image_size", 0, "preprocess.image_size: 0 must be >= 16"),
    ("train", "batch_size", -1, "train.batch_size: -1 must be >= 1"),
    ("data", "source", "no/such/photos", "data.source: no such folder or CSV file"),
    (
        "model",
        "backbone",
        "resnet5",
        "model.backbone: unknown backbone 'resnet5'; known: efficientnet_lite0",
    ),
]


@pytest.mark.parametrize(
    "section, key, value, message", BAD_PARAMS, ids=[f"{s}.{k}" for s, k, _, _ in BAD_PARAMS]
)
def test_a_bad_parameter_is_one_line_naming_it(
    tmp_path, capsys, section, key, value, message
) -> None:
    folder = _params_dir(tmp_path, section, key, value)
    result = run(folder, sys.executable, "stages/download.py", check=False, timeout=300)
    assert message in _one_line_error(result)
    assert not (folder / "data").exists() and not (folder / "models").exists()

    capsys.readouterr()
    assert run_cli(params_main, ["check", "--params", str(folder / "params.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


@pytest.mark.parametrize(
    "stage, missing", [("sample_triplets", "data/processed"), ("train", "data/")]
)
def test_a_stage_run_before_its_inputs_exist_says_what_to_run(tmp_path, stage, missing) -> None:
    """Run alone in a project with no data yet: one line naming the file and the command."""
    folder = _params_dir(tmp_path, "data", "source", str(tmp_path))
    result = run(folder, sys.executable, f"stages/{stage}.py", check=False, timeout=300)
    line = _one_line_error(result)
    assert missing in line and "missing; run the stage that writes it" in line, line
    assert "dvc repro" in line and not (folder / "models").exists()


def test_check_accepts_the_paths_it_checks(tmp_path, capsys) -> None:
    """The counterpart of the data.source case: an existing folder and weights file pass."""
    folder = _params_dir(tmp_path, "data", "source", "photos")
    (folder / "photos").mkdir()
    (folder / "w.safetensors").write_bytes(b"")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["model"]["weights"] = "w.safetensors"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_cli(params_main, ["check", "--params", str(folder / "params.yaml")]) == 0
    (folder / "w.safetensors").unlink()
    assert run_cli(params_main, ["check", "--params", str(folder / "params.yaml")]) == 2
    assert "model.weights: no such file w.safetensors" in capsys.readouterr().err


# --- the committed params.yaml (a hub dataset) on a machine without the hub -----------------


def _hub_resolves() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


OFFLINE_LINE = (
    "cannot reach the Hugging Face hub for Matthijs/snacks@refs/convert/parquet",
    "run the offline profile on a local folder: make repro-offline DATA=<image folder>",
)


def _download_default(tmp_path: Path, overrides: dict[str, str], offline: str) -> str:
    """`python stages/download.py` on the committed params.yaml, with an empty hub cache."""
    extra_env = {"HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path / "hf-home")}
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    if overrides:
        apply_params(tmp_path, overrides)
    result = subprocess.run(
        [sys.executable, "stages/download.py"],
        cwd=tmp_path,
        env=env() | extra_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = _one_line_error(result)
    assert all(part in line for part in OFFLINE_LINE), line
    assert not (tmp_path / "data").exists()
    return line


def test_hub_offline_mode_fails_at_once_without_retries(tmp_path) -> None:
    """HF_HUB_OFFLINE=1 works anywhere, online or not: nothing to retry, so one attempt."""
    line = _download_default(tmp_path, {}, offline="1")
    assert "OfflineModeIsEnabled" in line and "attempts" not in line


@pytest.mark.parametrize("retries", [0, None], ids=["retries-0", "default-retries"])
def test_no_network_is_one_line_naming_the_offline_profile(tmp_path, retries) -> None:
    """Without DNS for the hub the stage goes offline at once: no retries, whatever data.retries."""
    if _hub_resolves():
        pytest.skip("needs a machine that cannot reach huggingface.co")
    overrides = {} if retries is None else {"data.retries": str(retries)}
    line = _download_default(tmp_path, overrides, offline="0")
    assert "OfflineModeIsEnabled" in line and "attempts" not in line, line


# --- a pickle payload as model.weights, through the download stage ---------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth"])
def test_a_pickle_payload_as_weights_is_refused_by_download(tmp_path, name) -> None:
    """evil.pt: a bare pickle; evil.pth: torch.save's zip format. Both would run `touch`."""
    import torch

    marker, project = tmp_path / "pwned", tmp_path / "project"
    shutil.copytree(ROOT / "stages", project / "stages")
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    evil = {"stem.0.weight": _Payload(marker)}
    if name == "evil.pt":
        (project / name).write_bytes(pickle.dumps(evil))
        pickle.loads((project / name).read_bytes())
    else:
        torch.save(evil, project / name)
        torch.load(project / name, weights_only=False)
    assert marker.exists()  # the payload is live: unsafe loading runs it
    marker.unlink()

    photos = copy_photos(tmp_path / "photos", train=2, test=1, classes=2)
    settings = {"data.source": str(photos), "model.backbone": "tiny", "model.weights": name}
    apply_params(project, settings)
    result = run(project, sys.executable, "stages/download.py", check=False, timeout=300)
    line = _one_line_error(result)
    assert line.startswith(
        f"error: model.weights: {name} is not a plain tensor file and was not loaded"
    )
    assert "weights_only" not in line  # torch's advice to load it unsafely is not passed on
    assert not marker.exists() and not (project / "models" / "pretrained").exists()


# --- SIGKILL part-way through a stage ------------------------------------------------------


@pytest.fixture(scope="module")
def kill_template(tmp_path_factory) -> Path:
    """A committed project that has run `download` on 300 photos; each test works on a copy.

    preprocess.workers: 2 so the worker-pool path is the one killed, on any machine.
    """
    base = tmp_path_factory.mktemp("kill")
    photos = copy_photos(base / "photos", train=80, test=20, classes=3)
    project = make_project(base / "template", photos, {"preprocess.workers": "2"})
    run(project, "dvc", "repro", "download")
    commit(project)
    return project


@pytest.fixture(scope="module")
def reference(kill_template: Path) -> Path:
    """The uninterrupted run of the whole pipeline on a copy of the template."""
    project = shutil.copytree(kill_template, kill_template.parent / "reference", symlinks=True)
    out = run(project, "dvc", "repro").stdout
    assert ran(out) == set(STAGES) - {"download"}
    return project


def _copy(template: Path, name: str) -> Path:
    return shutil.copytree(template, template.parent / name, symlinks=True)


def _killed_by_sigkill(stderr: str) -> bool:
    """DVC's report of a stage that died of SIGKILL.

    DVC runs the command through /bin/sh: where the shell execs it, DVC sees signal 9 ("-9");
    where the shell (dash on some systems) waits on it, the shell exits 128 + 9 ("137").
    """
    return re.search(r"exited with (-9|137)\b", stderr) is not None


def _kill_stage(
    project: Path, stage: str, moment, command: tuple[str, ...], shard: int | None = None
) -> subprocess.CompletedProcess:
    """Run `command`, SIGKILL the stage's python process once `moment(process)` is true.

    `command` is `dvc repro ...` (the stage runs as its child) or the stage script itself;
    with `shard`, the process killed is the shard worker writing that shard (the pid in its
    `.tmp-shard-N-of-M-<pid>-*` folder).
    Returns the command's result; fails if the stage ended before the moment came, or if the
    command does not exit after the kill (something the stage started still holds its stdout).
    """
    proc = subprocess.Popen(
        command,
        cwd=project,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    victim, family, killed, left = None, [], False, []
    try:
        while proc.poll() is None and not killed:
            if victim is None:
                victim = next(
                    (p for p in _family(proc.pid) if _is_stage(p, stage, shard, project)), None
                )
            if victim is not None and moment(victim):
                family = victim.children(recursive=True)
                try:
                    victim.send_signal(signal.SIGKILL)
                    killed = True
                except psutil.NoSuchProcess:
                    break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=120)
        left = _still_running(family, grace=5.0)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{command} did not exit after {stage} was killed; still running: "
            f"{[(p.pid, _cmdline(p)) for p in family if _running(p)]}"
        ) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in family:
            if _running(p):
                p.kill()
    assert killed, f"{stage} ended before it could be killed; give it more work:\n{out}\n{err}"
    assert proc.returncode != 0
    assert not left, f"the killed stage left processes behind: {left}"
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _still_running(processes: list[psutil.Process], grace: float) -> list[int]:
    """The pids still running (not zombies) after up to `grace` seconds.

    A worker killed with its parent closes its stdout before it is a zombie, so right after the
    command's output ends it may still be on its way out: that is not a process left behind.
    """
    deadline = time.monotonic() + grace
    while True:
        alive = [p.pid for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _is_stage(
    process: psutil.Process, stage: str, shard: int | None = None, project: Path | None = None
) -> bool:
    """The python running stages/<stage>.py (not a shell that might wrap it), or the shard
    worker (`--shard-key`) writing shard `shard` of it in `project`."""
    try:
        args = process.cmdline()
    except psutil.Error:
        return False
    if len(args) < 2 or "python" not in Path(args[0]).name or args[1] != f"stages/{stage}.py":
        return False
    if shard is None:
        return "--shard-key" not in args
    writing = f"data/.shards/{stage}/.tmp-shard-{shard}-of-*-{process.pid}-*"
    return "--shard-key" in args and project is not None and any(project.glob(writing))


def _family(pid: int) -> list[psutil.Process]:
    """The process and its descendants (empty once it has exited)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _after(seconds: float):
    def moment(process: psutil.Process) -> bool:
        return time.time() - process.create_time() >= seconds

    return moment


def _when(project: Path, pattern: str):
    def moment(process: psutil.Process) -> bool:
        return any(project.glob(pattern))

    return moment


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _not_outputs(folder: Path, outputs: set[str]) -> list[str]:
    """Names in `folder` (if it exists) that are neither an expected output nor temporary."""
    if not folder.exists():
        return []
    return sorted(
        p.name for p in folder.iterdir() if p.name not in outputs and not p.name.startswith(".tmp-")
    )


# When preprocess is killed: still importing; writing the first split (train) into its temp
# folder; writing the later splits, with train.parquet already complete in the temp folder.
PREPROCESS_MOMENTS = {
    "importing": lambda project: _after(0.3),
    "first-split": lambda project: _when(
        project, "data/.tmp-processed-*/processed/.tmp-train.parquet-*"
    ),
    "later-splits": lambda project: _when(project, "data/.tmp-processed-*/processed/train.parquet"),
}
DVC_REPRO = ("dvc", "repro")


@pytest.mark.slow
@pytest.mark.parametrize("when", list(PREPROCESS_MOMENTS))
def test_killed_preprocess_leaves_nothing_half_written(kill_template, reference, when) -> None:
    project = _copy(kill_template, f"preprocess-{when}")
    result = _kill_stage(
        project, "preprocess", PREPROCESS_MOMENTS[when](project), (*DVC_REPRO, "preprocess")
    )
    assert "failed to reproduce 'preprocess'" in result.stderr and _killed_by_sigkill(result.stderr)

    processed, expected = project / "data/processed", _bytes(reference / "data/processed")
    assert not processed.exists() or _bytes(processed) == expected  # nothing, or all of it
    report = project / "metrics/data_report.json"
    assert (
        not report.exists()
        or report.read_bytes() == (reference / "metrics/data_report.json").read_bytes()
    )
    assert _not_outputs(project / "data", {"raw", "processed"}) == []
    assert _not_outputs(project / "metrics", {"data_report.json"}) == []
    assert "preprocess" in run(project, "dvc", "status", "preprocess").stdout  # not taken as done

    out = run(project, *DVC_REPRO, "preprocess").stdout
    assert ran(out) == {"preprocess"}, out
    assert _bytes(processed) == expected
    leftovers_gone = sorted(p.name for p in (project / "data").iterdir()) == ["processed", "raw"]
    assert leftovers_gone, sorted(p.name for p in (project / "data").iterdir())


@pytest.mark.slow
def test_killed_preprocess_script_keeps_the_previous_output(kill_template, reference) -> None:
    """Run directly (DVC deletes outputs first), a killed rerun keeps the last complete output."""
    project = _copy(kill_template, "preprocess-rerun")
    run(project, *DVC_REPRO, "preprocess")
    before = _bytes(project / "data/processed")
    report = (project / "metrics/data_report.json").read_bytes()
    _kill_stage(
        project,
        "preprocess",
        _when(project, "data/.tmp-processed-*/processed/train.parquet"),
        (sys.executable, "stages/preprocess.py"),
    )
    assert _bytes(project / "data/processed") == before == _bytes(reference / "data/processed")
    assert (project / "metrics/data_report.json").read_bytes() == report
    assert _not_outputs(project / "data", {"raw", "processed"}) == []
    out = run(project, *DVC_REPRO, "preprocess").stdout
    assert ran(out) == set() and "didn't change" in out, out


def _without_shards(report: Path) -> dict:
    data = json.loads(report.read_text())
    data["preprocess"].pop("shards")
    return data


def _names(shards: set[int]) -> str:
    """How the stage names shards: `shard 2`, `shards 0, 3`."""
    return ("shard " if len(shards) == 1 else "shards ") + ", ".join(map(str, sorted(shards)))


def _shard_lines(output: str, stage: str) -> set[int]:
    """The shards a stage's output says it ran (`<stage>: shard I of N: ...`)."""
    return {int(n) for n in re.findall(rf"^{stage}: shard (\d+) of \d+:", output, re.MULTILINE)}


@pytest.mark.slow
def test_a_killed_shard_is_the_only_one_redone(kill_template, reference) -> None:
    """preprocess.shards 4: killing the worker on shard 2 fails the stage (the launcher stops the
    other worker) but keeps the finished shards; the next `dvc repro` runs only the others, and
    the merged output is byte for byte the single-shard run's."""
    project = _copy(kill_template, "preprocess-shards")
    apply_params(project, {"preprocess.shards": "4"})
    commit(project)
    pieces = project / "data/.shards/preprocess"
    result = _kill_stage(
        project,
        "preprocess",
        _when(project, "data/.shards/preprocess/.tmp-shard-2-of-4-*"),
        (*DVC_REPRO, "preprocess"),
        shard=2,
    )
    assert "failed to reproduce 'preprocess'" in result.stderr
    assert "error: preprocess: shard 2 (killed by SIGKILL) of 4 failed" in result.stderr
    finished = {i for i in range(4) if (pieces / f"shard-{i}-of-4/done.json").is_file()}
    assert 2 not in finished and _shard_lines(result.stdout, "preprocess") <= finished
    assert {p.name for p in pieces.iterdir() if not p.name.startswith(".tmp-")} == {
        f"shard-{i}-of-4" for i in finished
    }
    assert not (project / "data/processed").exists()
    out = run(project, *DVC_REPRO, "preprocess").stdout
    assert f"running {_names({0, 1, 2, 3} - finished)} (" in out, out
    assert _shard_lines(out, "preprocess") == {0, 1, 2, 3} - finished, out
    assert _bytes(project / "data/processed") == _bytes(reference / "data/processed")
    assert _without_shards(project / "metrics/data_report.json") == _without_shards(
        reference / "metrics/data_report.json"
    )
    assert not pieces.exists()  # merged, then removed
    assert sorted(p.name for p in (project / "data").iterdir()) == ["processed", "raw"]


@pytest.mark.slow
def test_a_killed_sharded_stage_takes_its_shards_with_it(kill_template) -> None:
    """SIGKILL of the stage process itself: no shard process outlives it (checked by
    `_kill_stage`), and the shards that had finished are kept for the next run."""
    project = _copy(kill_template, "preprocess-shards-parent")
    apply_params(project, {"preprocess.shards": "4"})
    commit(project)
    result = _kill_stage(
        project,
        "preprocess",
        _when(project, "data/.shards/preprocess/shard-0-of-4/done.json"),
        (*DVC_REPRO, "preprocess"),
    )
    assert _killed_by_sigkill(result.stderr), result.stderr
    out = run(project, *DVC_REPRO, "preprocess").stdout
    kept = re.search(r"^preprocess: 4 shards; shards? ([\d, ]+) already done, kept", out, re.M)
    assert kept and 0 in {int(n) for n in kept.group(1).split(", ")}, out  # done before the kill
    assert _shard_lines(out, "preprocess") == {0, 1, 2, 3} - {
        int(n) for n in kept.group(1).split(", ")
    }, out
    assert sorted(p.name for p in (project / "data").iterdir()) == ["processed", "raw"]


@pytest.mark.slow
def test_sharded_gallery_is_the_single_run_gallery(kill_template, reference) -> None:
    """export.shards 3: kill shard 1 mid-embedding, rerun: the unfinished shards run again, and the
    gallery is the single-shard one: shard ranges fall on batch boundaries, so each forward pass
    sees the same images, but a worker runs on its share of the threads, and some CPUs' fp32
    kernels split their sums by thread count (AVX2 Zen 3: the last bits of a partial batch)."""
    project = _copy(kill_template, "export-shards")
    apply_params(project, {"export.shards": "3"})
    commit(project)
    run(project, *DVC_REPRO, "train", "baseline")
    result = _kill_stage(
        project,
        "export_gallery",
        _when(project, "data/.shards/export_gallery/.tmp-shard-1-of-3-*"),
        (*DVC_REPRO, "export_gallery"),
        shard=1,
    )
    assert "error: export_gallery: shard 1 (killed by SIGKILL) of 3 failed" in result.stderr
    pieces = project / "data/.shards/export_gallery"
    done = {p.name: json.loads((p / "done.json").read_text()) for p in pieces.glob("shard-*")}
    finished = {d["shard"] for d in done.values()}
    assert 1 not in finished and _shard_lines(result.stdout, "export_gallery") <= finished
    out = run(project, *DVC_REPRO).stdout
    assert ran(out) == {"export_gallery", "copy_gallery", "index_gallery", "evaluate"}, out
    assert f"running {_names({0, 1, 2} - finished)} (" in out, (out, done)
    assert _shard_lines(out, "export_gallery") == {0, 1, 2} - finished, out
    _assert_same_gallery(project / "data/gallery", reference / "data/gallery")
    assert (project / "metrics/test.json").read_bytes() == (
        reference / "metrics/test.json"
    ).read_bytes()
    assert not (project / "data/.shards").exists()


def _assert_same_gallery(folder: Path, reference: Path) -> None:
    """The same card, rows and row groups, and vectors equal to float32 rounding."""
    assert (folder / "meta.json").read_bytes() == (reference / "meta.json").read_bytes()
    files = [pq.ParquetFile(f / "embeddings.parquet") for f in (folder, reference)]
    assert files[0].schema_arrow == files[1].schema_arrow
    assert files[0].metadata.num_row_groups == files[1].metadata.num_row_groups
    got, want = (f.read() for f in files)
    assert got.drop_columns("vector").equals(want.drop_columns("vector"))
    vectors = [np.stack(t.column("vector").to_numpy(zero_copy_only=False)) for t in (got, want)]
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_killed_training_reruns_to_the_same_metrics(kill_template, reference) -> None:
    project = _copy(kill_template, "train-killed")
    run(project, *DVC_REPRO, "sample_triplets")
    # dvclive writes metrics.json after each epoch: kill during the second (last) one.
    result = _kill_stage(project, "train", _when(project, "metrics/train/metrics.json"), DVC_REPRO)
    assert "failed to reproduce 'train'" in result.stderr and _killed_by_sigkill(result.stderr)

    models = project / "models"
    assert _not_outputs(models, {"pretrained"}) == []  # no model.safetensors, no config.json
    assert not (project / "metrics/test.json").exists()
    assert "train" in run(project, "dvc", "status", "train").stdout

    out = run(project, *DVC_REPRO).stdout
    assert (
        {"train", "export_gallery", "index_gallery", "evaluate"}
        <= ran(out)
        <= {"train", "baseline", "export_gallery", "copy_gallery", "index_gallery", "evaluate"}
    )  # baseline and copy_gallery need no model: they ran unless the kill came first
    assert (project / "metrics/test.json").read_bytes() == (
        reference / "metrics/test.json"
    ).read_bytes()
    assert (models / "model.safetensors").read_bytes() == (
        reference / "models/model.safetensors"
    ).read_bytes()
    assert sorted(p.name for p in models.iterdir()) == [
        "config.json",
        "model.safetensors",
        "pretrained",
    ]
