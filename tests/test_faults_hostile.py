"""Issue 23, hostile or broken files a user may hand over: none may hang, exhaust memory, read or write outside the
folders given, or end in a traceback; each is skipped or refused with its name and reason, the same in every stage.

* manifest records (not an object, no id, a path-like or overlong id, a field of the wrong type, invalid UTF-8 or
  JSON, a duplicate id with another record): refused naming file, line and reason by loading, generation resume and
  `merge`; an identical duplicate (two processes wrote one image) collapses into one record.
* class-folder entries that are not regular files (FIFO, socket, device, folder named x.png, dangling symlink,
  symlink loop): skipped with their reason, never opened; a symlink to an image file is loaded.
* a PNG that declares a huge image: refused from its header with the size and the bound, memory stays small; a PNG
  whose image data ends early (torchvision 0.29 crashes the process on it) is a named bad image.
* EXIF orientation: images load upright.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_faults_generation import SD
from test_faults_inputs import assert_one_line, run_cli, write_classes

from synthgap_helpers import config, data, imagesets, sets, storage
from synthgap_helpers.sd import stage as sd_generate

CHILD_TIMEOUT = 120  # seconds: far above a normal run (a few seconds), so only a hang reaches it


def child(code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter importing this checkout (PYTHONPATH passes through), killed if it hangs."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, env=os.environ.copy())


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A tiny `generate sd` run directory (cat and dog, 3 images each), made once and copied by `sd_run`."""
    run_dir = tmp_path_factory.mktemp("generated") / "run"
    sd_generate.run(config.resolve("smoke", run_dir=run_dir, overrides=SD))
    return run_dir


@pytest.fixture
def sd_run(generated, tmp_path):
    """A fresh copy of the generated run: its config and its synthetic/sd folder."""
    shutil.copytree(generated, tmp_path / "run", symlinks=True)
    cfg = config.resolve("smoke", run_dir=tmp_path / "run", overrides=SD)
    return cfg, sd_generate.output_folder(cfg)


# --------------------------------------------------------------------------------------------- manifest records

GOOD = {"id": "cat/extra", "class": "cat", "prompt": "a cat", "source_id": None}
HOSTILE_LINES = {
    "not an object": (b"[1, 2]", "a JSON list, not an object"),
    "no id": (json.dumps({"class": "cat"}).encode(), "no id"),
    "id climbing out": (json.dumps({**GOOD, "id": "cat/../../../outside"}).encode(), "not '<class>/<name>'"),
    "absolute id": (json.dumps({**GOOD, "id": "/etc/passwd"}).encode(), "not '<class>/<name>'"),
    "nested id": (json.dumps({**GOOD, "id": "cat/a/b"}).encode(), "not '<class>/<name>'"),
    "hidden id": (json.dumps({**GOOD, "id": "cat/.hidden"}).encode(), "not '<class>/<name>'"),
    "empty id": (json.dumps({**GOOD, "id": ""}).encode(), "not '<class>/<name>'"),
    "NUL in id": (json.dumps({**GOOD, "id": "cat/a\u0000b"}).encode(), "not '<class>/<name>'"),
    "overlong id": (json.dumps({**GOOD, "id": "cat/" + "a" * 300}).encode(), "at most 200 bytes"),
    "numeric id": (json.dumps({**GOOD, "id": 5}).encode(), "its id 5 is int, not a string"),
    "list source_id": (json.dumps({**GOOD, "source_id": ["train/1"]}).encode(), "field 'source_id' is list"),
    "numeric sha256": (json.dumps({**GOOD, "sha256": 12}).encode(), "field 'sha256' is int"),
    "numeric class": (json.dumps({**GOOD, "class": 3}).encode(), "field 'class' is int"),
    "invalid UTF-8": (b'{"id": "cat/\xff\xfe"}', "not valid UTF-8"),
    "invalid JSON": (b'{"id": "cat/x"', "not valid JSON"),
}


def consumers(cfg, folder: Path, capsys) -> dict[str, str]:
    """What each stage reading the folder's manifest says: loading, the synthetic set of the run, the provenance
    check of the low-data sweep, generation resume (DataError messages), `merge` (the CLI's one line)."""
    said = {}
    for name, read in {"load": lambda: imagesets.load_image_folder(folder),
                       "run sets": lambda: sets.loaded_sets(cfg),
                       "provenance": lambda: sets.provenance_problem(sets.SyntheticSet("mine", (folder,), False)),
                       "generate": lambda: sd_generate.run(cfg)}.items():
        with pytest.raises(data.DataError) as refused:
            read()
        said[name] = str(refused.value)
    status, err = run_cli(capsys, "merge", str(folder))
    assert status == 2
    assert_one_line(err)
    said["merge"] = err.removeprefix("error: ").strip()
    return said


@pytest.mark.parametrize("kind", HOSTILE_LINES)
def test_a_hostile_manifest_line_is_refused_the_same_way_by_every_stage(sd_run, capsys, kind):
    cfg, folder = sd_run
    line, reason = HOSTILE_LINES[kind]
    manifest = folder / "manifest.jsonl"
    original = manifest.read_bytes()
    manifest.write_bytes(original + line + b"\n")
    (cfg.run_dir / "outside.png").write_bytes((folder / "cat" / "sd_000000.png").read_bytes())  # where the id leads
    pngs = sorted(cfg.run_dir.parent.rglob("*.png"))

    said = consumers(cfg, folder, capsys)
    assert len(set(said.values())) == 1, said  # one decision, one message, whichever stage reads the file
    message = said["load"]
    assert f"{manifest}, line 7: " in message and reason in message and "delete the line" in message
    assert manifest.read_bytes() == original + line + b"\n"  # nothing rewritten, nothing written anywhere
    assert sorted(cfg.run_dir.parent.rglob("*.png")) == pngs

    manifest.write_bytes(original)  # the fix the message gives: delete the line
    assert len(imagesets.load_image_folder(folder)) == 6 and sd_generate.run(cfg).written == 0


def test_a_duplicate_id_with_another_record_is_refused_naming_both_lines_and_an_identical_one_collapses(sd_run,
                                                                                                        capsys):
    cfg, folder = sd_run
    manifest = folder / "manifest.jsonl"
    original = manifest.read_bytes()
    first = json.loads(original.splitlines()[0])
    manifest.write_bytes(original + storage.Manifest.encode(first))  # a past race: the same record twice
    assert imagesets.load_image_folder(folder).ids == [json.loads(x)["id"] for x in original.splitlines()]
    assert sd_generate.run(cfg).written == 0
    status, err = run_cli(capsys, "merge", str(folder))
    assert status == 0 and manifest.read_bytes() == original  # merged into one record per id

    manifest.write_bytes(original + storage.Manifest.encode({**first, "prompt": "another prompt"}))
    said = consumers(cfg, folder, capsys)
    assert len(set(said.values())) == 1, said
    assert f"{manifest}, line 7: id {first['id']!r} differs from its record at {manifest}, line 1" in said["load"]


def test_the_writer_refuses_an_id_that_would_leave_its_folder(tmp_path):
    writer = imagesets.ImageFolderWriter(tmp_path / "set")
    image = np.zeros((1, 3, 8, 8), np.uint8)
    for bad in ("cat/../../escaped", "cat/.hidden", "cat/a/b"):
        with pytest.raises(data.DataError, match="cannot write image id"):
            writer.write(image, [{"id": bad}])
    assert list(tmp_path.rglob("*")) == []  # nothing written, inside the folder or out of it


# --------------------------------------------------------------------------------------------- class-folder entries

LOAD_CHILD = """
    import json, sys, warnings
    from synthgap_helpers import imagesets
    warnings.simplefilter("ignore")
    loaded = imagesets.load_image_folder(sys.argv[1])
    print(json.dumps({"ids": loaded.ids, "skipped": loaded.report.skipped}))
"""


def test_entries_that_are_not_regular_files_are_skipped_with_their_reason_and_never_opened(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    write_classes(folder, per_class=1)
    cat = folder / "cat"
    os.mkfifo(cat / "fifo.png")  # opening it for reading blocks until a writer comes
    os.symlink("loop_b.png", cat / "loop_a.png")
    os.symlink("loop_a.png", cat / "loop_b.png")
    os.symlink("nowhere.png", cat / "dangling.png")
    (cat / "folder.png").mkdir()
    os.symlink("/dev/zero", cat / "device.png")  # a character device: reading it never ends
    monkeypatch.chdir(cat)  # a socket's path must be short: bind it relative to the folder
    server = socket.socket(socket.AF_UNIX)
    server.bind("socket.png")
    os.symlink(folder / "dog" / "0000.png", cat / "linked.png")  # symlinks to image files are followed

    done = child(LOAD_CHILD, str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert sorted(result["ids"]) == sorted([f"{name}/0000" for name in imagesets.CIFAR10_CLASSES] + ["cat/linked"])
    reasons = {Path(file).name: reason for file, reason in result["skipped"]}
    assert reasons.keys() == {"fifo.png", "loop_a.png", "loop_b.png", "dangling.png", "folder.png", "device.png",
                              "socket.png"}
    expected = {"fifo.png": "a named pipe (FIFO)", "loop_a.png": "a symlink loop", "dangling.png": "a dangling symlink",
                "folder.png": "a folder", "device.png": "a character device", "socket.png": "a socket"}
    for name, kind in expected.items():
        assert reasons[name].startswith(f"{kind}"), (name, reasons[name])
    server.close()


@pytest.mark.slow
def test_a_fifo_in_place_of_a_listed_png_is_regenerated_not_waited_on(sd_run):
    cfg, folder = sd_run
    victim = folder / "cat" / "sd_000001.png"
    original = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)
    done = child("""
        import sys
        from synthgap_helpers import config
        from synthgap_helpers.sd import stage
        print(stage.run(config.resolve("smoke", run_dir=sys.argv[1], overrides=eval(sys.argv[2]))))
    """, str(cfg.run_dir), repr(SD))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 repaired" in done.stdout and "a named pipe (FIFO)" in done.stdout
    assert victim.is_file() and victim.read_bytes() == original


# --------------------------------------------------------------------------------------------- image headers

def png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes that declares `width` x `height` RGB pixels, with far less image data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is edited to declare `width` x `height` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    payload = bytearray(buffer.getvalue())
    frame = payload.index(b"\xff\xc0")
    payload[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(payload)


def test_an_image_declaring_a_huge_size_is_refused_from_its_header_and_a_short_png_is_a_named_bad_image(tmp_path):
    folder = tmp_path / "mine"
    write_classes(folder, per_class=1)
    (folder / "cat" / "bomb.png").write_bytes(png(100_000, 100_000))
    (folder / "cat" / "large.png").write_bytes(png(12_000, 12_000))  # over our bound, under twice Pillow's
    (folder / "cat" / "short.png").write_bytes(png(32, 32))  # torchvision 0.29's decoder segfaults on it
    (folder / "cat" / "jpeg_bomb.jpg").write_bytes(jpeg(65_000, 65_000))
    done = child("""
        import json, resource, sys
        from synthgap_helpers import imagesets
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loaded = imagesets.load_image_folder(sys.argv[1], on_bad_image="skip")
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(json.dumps({"loaded": len(loaded), "skipped": loaded.report.skipped, "grown_mb": grown}))
    """, str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["loaded"] == 10 and len(result["skipped"]) == 4 and result["grown_mb"] < 200, result
    reasons = dict(result["skipped"])
    bomb = reasons[str(folder / "cat" / "bomb.png")]
    assert "declares 10000000000 pixels" in bomb and f"bound of {imagesets.MAX_IMAGE_PIXELS} pixels" in bomb
    assert "declares 12000 x 12000 = 144000000 pixels" in reasons[str(folder / "cat" / "large.png")]
    assert "declares 65000 x 65000 = 4225000000 pixels" in reasons[str(folder / "cat" / "jpeg_bomb.jpg")]
    assert "cannot read image" in reasons[str(folder / "cat" / "short.png")]
    with pytest.raises(data.DataError, match="bomb.png: declares 10000000000 pixels"):
        imagesets.load_image_folder(folder)  # the default policy refuses, naming it


# --------------------------------------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_an_image_with_an_exif_orientation_loads_upright(tmp_path, suffix):
    folder = tmp_path / "mine"
    write_classes(folder, per_class=1)
    upright = np.zeros((32, 32, 3), np.uint8)
    upright[:8] = 255  # a white band along the top
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate the stored pixels 90 degrees clockwise to view them
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what such a camera stores
    stored.save(folder / "cat" / f"turned{suffix}", exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    loaded = imagesets.load_image_folder(folder)
    image = loaded.images[loaded.ids.index("cat/turned")].numpy().transpose(1, 2, 0).astype(int)
    assert np.abs(image - upright).max() <= 8  # lossless PNG: exact; JPEG at quality 100: within its rounding
