"""Scanning, decoding, skipping bad files, caching and duplicate finding."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from conftest import jpeg_bytes, png_bomb, synthetic_image
from PIL import Image

from lungxray.config import DataConfig, Preprocessing
from lungxray.data import DataError, UnusableImage, load_dataset
from lungxray.decode import decode
from lungxray.layout import normalise_class_name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Viral Pneumonia", "viral_pneumonia"),
        ("COVID-19", "covid_19"),
        ("normal", "normal"),
        ("ViralPneumonia", "viral_pneumonia"),
        ("  Bacterial  pneumonia ", "bacterial_pneumonia"),
        ("Норма", "норма"),  # letters of every script are kept, case-folded
        ("正常", "正常"),
        ("Pneumonía Viral", "pneumonía_viral"),
        ("ＣＯＶＩＤ－１９", "covid_19"),  # NFKC: full-width forms are the ASCII ones
        ("+++", ""),  # no letter: no class (discover refuses the folder)
    ],
)
def test_class_names_are_snake_case(name, expected):
    assert normalise_class_name(name) == expected


def test_flat_layout_classes_counts_and_pixels(flat_tree, cache_dir):
    plain = DataConfig(Preprocessing(img_size=16, crop_borders=False, equalize="none"), cache_dir=cache_dir)
    ds = load_dataset(flat_tree, plain, progress=False)
    assert ds.layout == "flat"
    assert ds.classes == ["covid", "normal", "viral_pneumonia"]
    assert ds.counts() == {"covid": 12, "normal": 12, "viral_pneumonia": 12}
    assert ds.images.shape == (36, 16, 16) and ds.images.dtype == np.uint8
    assert ds.skipped == [] and ds.duplicate_groups == []
    # the class band survives preprocessing: class 0 is bright on the left third
    first = ds.images[ds.labels == 0].astype(float)
    assert first[:, :, :5].mean() > first[:, :, -5:].mean() + 50


def test_split_layout_finds_cross_split_copy(split_tree, cache_dir):
    ds = load_dataset(split_tree, DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)
    assert ds.layout == "split"
    summary = ds.summary()
    assert summary["counts_by_folder"]["train"] == {"covid": 10, "normal": 10, "viral_pneumonia": 10}
    assert summary["counts_by_folder"]["test"]["covid"] == 5
    pairs = [sorted(p) for p in summary["cross_split_duplicates"]]
    assert pairs == [
        sorted([str(split_tree / "test/Covid/copy_of_train.png"), str(split_tree / "train/Covid/img000.png")])
    ]
    assert len(summary["duplicate_groups"]) == 1


def test_near_duplicate_reencoded_and_brightened_copy_is_grouped(flat_tree, cache_dir):
    original = np.asarray(Image.open(flat_tree / "Normal" / "img003.png"))
    near = np.clip(original.astype(int) + 6, 0, 255).astype(np.uint8)
    (flat_tree / "Normal" / "near_copy.jpg").write_bytes(jpeg_bytes(near, quality=90))
    ds = load_dataset(flat_tree, DataConfig(Preprocessing(img_size=32), cache_dir=cache_dir), progress=False)
    names = [sorted(ds.samples[i].path.name for i in g) for g in ds.duplicate_groups]
    assert names == [["img003.png", "near_copy.jpg"]]


def test_bad_files_are_listed_with_reasons_not_crashed_on(flat_tree, cache_dir):
    bad = flat_tree / "Covid"
    (bad / "empty.png").write_bytes(b"")
    (bad / "report.pdf.png").write_bytes(b"%PDF-1.4 not an image at all")
    good_jpeg = jpeg_bytes(synthetic_image(0, 99, size=64))
    (bad / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (bad / "bomb.png").write_bytes(png_bomb())
    (flat_tree / "stray.txt").write_text("not in a class folder")
    (bad / "moved.png").symlink_to(flat_tree / "no_such_file.png")
    ds = load_dataset(flat_tree, DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)
    reasons = {os.path.basename(s.path): s.reason for s in ds.skipped}
    assert set(reasons) == {"empty.png", "report.pdf.png", "truncated.jpg", "bomb.png", "stray.txt", "moved.png"}
    assert "broken symbolic link" in reasons["moved.png"]
    assert "zero bytes" in reasons["empty.png"]
    assert "not an image" in reasons["report.pdf.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "not inside a class folder" in reasons["stray.txt"]
    assert ds.counts()["covid"] == 12  # the good images are all still there
    # and a cached second scan reports the same reasons
    again = load_dataset(flat_tree, DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)
    assert {os.path.basename(s.path): s.reason for s in again.skipped} == reasons


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("L", "PNG"),
        ("RGB", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("L", "BMP"),
        ("RGB", "TIFF"),
        ("I;16", "PNG"),
    ],
)
def test_decodes_modes_and_formats(mode, fmt):
    base = synthetic_image(1, 0, size=64)  # bright middle band
    img = Image.fromarray(base)
    if mode == "I;16":
        img = Image.fromarray(base.astype(np.uint16) * 16)  # 12-bit data in 16 bits
        assert img.mode == "I;16"
    elif mode != "L":
        img = img.convert(mode)
    out = decode(_encode(img, fmt), Preprocessing(img_size=32))
    assert out.shape == (32, 32) and out.dtype == np.uint8
    middle, left = out[:, 12:20].mean(), out[:, :8].mean()
    assert middle > left + 40, f"{mode}/{fmt}: band lost (middle {middle:.0f}, left {left:.0f})"


def test_exif_orientation_is_applied():
    top_bright = np.zeros((40, 60), np.uint8)
    top_bright[:20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was rotated: display needs 90 degrees clockwise
    out = decode(_encode(Image.fromarray(top_bright), "JPEG", exif=exif), Preprocessing(img_size=32))
    assert out[:, 20:].mean() > 200 and out[:, :12].mean() < 50  # the bright half is now on the right


def test_decode_rejects_unsupported_mode():
    from lungxray.decode import _to_gray_uint8

    with pytest.raises(UnusableImage, match="unsupported image mode 'HSV'"):
        _to_gray_uint8(Image.new("HSV", (8, 8)))


def test_class_without_usable_image_is_a_clear_error(flat_tree, cache_dir):
    (flat_tree / "Empty Class").mkdir()
    (flat_tree / "Empty Class" / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="empty_class"):
        load_dataset(flat_tree, DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)


def test_fewer_than_two_classes_is_a_clear_error(tmp_path, cache_dir):
    folder = tmp_path / "one" / "normal"
    folder.mkdir(parents=True)
    Image.fromarray(synthetic_image(0, 0)).save(folder / "a.png")
    with pytest.raises(DataError, match="need at least 2"):
        load_dataset(tmp_path / "one", DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)


def test_second_scan_decodes_nothing(flat_tree, cache_dir, monkeypatch):
    cfg = DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir)
    first = load_dataset(flat_tree, cfg, progress=False)
    import lungxray.data as data

    def fail(*args, **kwargs):
        raise AssertionError("a cached scan decoded a file")

    monkeypatch.setattr(data, "_process_file", fail)
    second = load_dataset(flat_tree, cfg, progress=False)
    assert np.array_equal(first.images, second.images)
    assert [s.sha256 for s in first.samples] == [s.sha256 for s in second.samples]
    index = json.loads((cache_dir / "index.json").read_text())
    assert len(index) == 36


def test_changed_file_is_decoded_again(flat_tree, cache_dir):
    cfg = DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir)
    load_dataset(flat_tree, cfg, progress=False)
    target = flat_tree / "Covid" / "img000.png"
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(target)
    ds = load_dataset(flat_tree, cfg, progress=False)
    i = [s.path for s in ds.samples].index(target)
    assert (ds.images[i] == 7).all()


def test_shared_dataset_duplicates_are_found(shared_data, tmp_path):
    ds = load_dataset(shared_data, DataConfig(cache_dir=tmp_path / "cache"), progress=False)
    assert ds.layout == "split" and ds.classes == ["covid", "normal", "viral_pneumonia"]
    assert len(ds.samples) == 317 and ds.skipped == []
    # byte-identical copies across train/ and test/ are found without being named in the code
    identical = [(a, b) for a, b in ds.cross_split_duplicates if ds.samples[a].sha256 == ds.samples[b].sha256]
    assert len(identical) >= 5
    assert all(ds.samples[a].group == ds.samples[b].group for a, b in ds.cross_split_duplicates)


def test_class_folders_that_change_the_labels_are_errors_naming_them(tmp_path, cache_dir):
    """Class folders whose names collide once normalised, an empty class folder, and split folders
    with different classes are errors naming the folders, never a silent merge, a vanished class or
    an extra class with no training image."""
    from conftest import write_tree

    clash = write_tree(tmp_path / "clash", per_class=3)
    (clash / "Normal").rename(clash / "normal")
    (clash / "NORMAL").mkdir()
    (clash / "NORMAL" / "x.png").write_bytes((clash / "Covid" / "img000.png").read_bytes())
    with pytest.raises(DataError, match="name the same class") as info:
        load_dataset(clash, DataConfig(cache_dir=cache_dir), progress=False)
    assert "NORMAL" in str(info.value) and "normal" in str(info.value)

    empty = write_tree(tmp_path / "empty", per_class=3)
    (empty / "Tuberculosis").mkdir()
    with pytest.raises(DataError, match="Tuberculosis holds no file"):
        load_dataset(empty, DataConfig(cache_dir=cache_dir), progress=False)

    split = tmp_path / "split"
    write_tree(split / "train", per_class=3)
    write_tree(split / "test", per_class=2, start=5)
    (split / "test" / "Covid").rename(split / "test" / "Covid19")
    with pytest.raises(DataError, match="different classes") as info:
        load_dataset(split, DataConfig(cache_dir=cache_dir), progress=False)
    assert "test/ lacks covid" in str(info.value) and "train/ lacks covid19" in str(info.value)
    # evaluating on part of the classes stays possible
    assert len(load_dataset(split, DataConfig(cache_dir=cache_dir), progress=False, min_classes=1).classes) == 4


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_class_folder_is_an_error(flat_tree, cache_dir):
    (flat_tree / "Normal").chmod(0)
    try:
        with pytest.raises(DataError, match="cannot be read"):
            load_dataset(flat_tree, DataConfig(cache_dir=cache_dir), progress=False)
    finally:
        (flat_tree / "Normal").chmod(0o755)


def test_the_scan_keeps_its_images_in_one_memory_mapped_stack(flat_tree, cache_dir, monkeypatch):
    """The images of a scan are one read-only memory-mapped file in the cache, made once; training
    reads batches from it (``Images``) with the values ``to_tensor`` gives."""
    import torch

    from lungxray.infer import Images, to_tensor

    cfg = DataConfig(Preprocessing(img_size=32), cache_dir=cache_dir)
    ds = load_dataset(flat_tree, cfg, progress=False)
    assert isinstance(ds.images, np.memmap) and not ds.images.flags.writeable
    [stack] = cache_dir.rglob("stack-*.u8")
    assert stack.stat().st_size == len(ds.samples) * 32 * 32
    for i in (0, 7, len(ds.samples) - 1):
        assert np.array_equal(ds.images[i], decode(ds.samples[i].path.read_bytes(), Preprocessing(img_size=32)))
    made = stack.stat().st_mtime_ns
    from lungxray.cache import PreprocessCache

    reads = []
    original = PreprocessCache.pixels
    monkeypatch.setattr(PreprocessCache, "pixels", lambda self, sha: reads.append(sha) or original(self, sha))
    again = load_dataset(flat_tree, cfg, progress=False)
    assert reads == []  # a warm scan reads no image: hashes from the entries, pixels from the stack
    assert stack.stat().st_mtime_ns == made and np.array_equal(np.asarray(again.images), np.asarray(ds.images))
    idx = np.array([5, 1, 30, 2])
    x = Images(ds.images, idx)
    assert x.shape == (4, 1, 32, 32) and len(x) == 4
    assert torch.equal(x[torch.tensor([2, 0])], to_tensor(ds.images[idx[[2, 0]]]))
    assert torch.equal(x[1:3], to_tensor(ds.images[idx[1:3]])) and x[0].shape == (1, 32, 32)


def test_a_class_folder_named_by_symbols_only_is_an_error_naming_it(flat_tree, cache_dir):
    (flat_tree / "+++").mkdir()
    (flat_tree / "+++" / "x.png").write_bytes((flat_tree / "Covid" / "img000.png").read_bytes())
    with pytest.raises(DataError, match="names no class") as info:
        load_dataset(flat_tree, DataConfig(cache_dir=cache_dir), progress=False)
    assert str(flat_tree / "+++") in str(info.value)


def test_hidden_special_and_unreadable_entries_are_listed_as_skipped(flat_tree, cache_dir, monkeypatch):
    """Hidden files and folders (never a class's images), an unreadable sub-folder (with its OS
    error), a named pipe (never opened: the scan would wait forever), a socket and a link to a
    device are each listed as skipped with the reason; the classes and counts are unchanged."""
    import socket

    png = (flat_tree / "Covid" / "img000.png").read_bytes()
    (flat_tree / "Viral Pneumonia" / ".thumbs").mkdir()
    (flat_tree / "Viral Pneumonia" / ".thumbs" / "x.png").write_bytes(png)
    (flat_tree / "Normal" / ".DS_Store").write_bytes(b"\0")
    (flat_tree / ".cache").mkdir()
    (flat_tree / ".cache" / "y.png").write_bytes(png)
    locked = flat_tree / "Covid" / "locked"
    locked.mkdir()
    (locked / "z.png").write_bytes(png)
    os.mkfifo(flat_tree / "Covid" / "pipe.png")
    (flat_tree / "Normal" / "null.png").symlink_to("/dev/null")
    monkeypatch.chdir(flat_tree / "Normal")  # a relative name: a socket's path has a length limit
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.png")
    locked.chmod(0)
    if os.geteuid() == 0:  # root lists every folder: the refusal is the kernel's answer to anyone else
        listdir = os.listdir

        def refuse(path):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return listdir(path)

        monkeypatch.setattr(os, "listdir", refuse)
    try:
        ds = load_dataset(flat_tree, DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir), progress=False)
    finally:
        locked.chmod(0o755)
        server.close()
    reasons = {os.path.relpath(s.path, flat_tree): s.reason for s in ds.skipped}
    assert reasons == {
        ".cache": "hidden",
        "Viral Pneumonia/.thumbs": "hidden",
        "Normal/.DS_Store": "hidden",
        "Covid/locked": "folder cannot be read: Permission denied",
        "Covid/pipe.png": "not a regular file: a named pipe (FIFO)",
        "Normal/sock.png": "not a regular file: a socket",
        "Normal/null.png": "not a regular file: a device (a symbolic link to /dev/null)",
    }
    assert ds.classes == ["covid", "normal", "viral_pneumonia"]
    assert ds.counts() == {"covid": 12, "normal": 12, "viral_pneumonia": 12}


def test_a_cache_on_a_full_disk_falls_back_to_memory_once_and_leaves_no_empty_file(
    flat_tree, cache_dir, monkeypatch, recwarn
):
    """Every write into the cache fails as on a full disk (the file is made, its bytes are refused
    with ENOSPC): the scan keeps its images in memory, warns once naming the cache, and leaves no
    empty or partial image that a later scan would trust; that later scan, with room again, fills
    the cache."""
    import builtins
    import errno
    import io

    cfg = DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir)
    opened = builtins.open

    class Full(io.RawIOBase):
        """A file on a full disk: made, but every byte refused as the kernel refuses them."""

        def __init__(self, file, mode):
            super().__init__()
            opened(file, mode.replace("x", "w").replace("a", "w")).close()

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and str(cache_dir) in os.fspath(file):
            return Full(file, mode)
        return opened(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    monkeypatch.setattr(io, "open", full_disk)
    ds = load_dataset(flat_tree, cfg, progress=False)
    monkeypatch.undo()
    said = [str(w.message) for w in recwarn if "cache" in str(w.message)]
    assert len(said) == 1 and str(cache_dir) in said[0] and "memory" in said[0]
    assert not list(cache_dir.rglob("*.u8"))  # nothing whole was written, so nothing is kept
    assert not list(cache_dir.rglob(".*"))  # no draft left behind
    for i in (0, 17, 35):
        assert np.array_equal(ds.images[i], decode(ds.samples[i].path.read_bytes(), Preprocessing(img_size=16)))
    again = load_dataset(flat_tree, cfg, progress=False)
    assert np.array_equal(np.asarray(again.images), np.asarray(ds.images))
    assert all(p.stat().st_size == 16 * 16 for p in cache_dir.rglob("*.u8") if not p.name.startswith("stack-"))
    assert len(list(cache_dir.rglob("*.u8"))) == 36 + 1  # every image, and the stack


def test_a_scan_reads_each_file_once_whatever_it_preprocesses(flat_tree, cache_dir, monkeypatch):
    """Cropped and equalised, each film is decoded twice (the plain resize the duplicate search
    reads, and the model's input) from one read of its bytes; the warm scan reads no file and
    makes no status call on the cache's images (one listing of their folder answers for all)."""
    from collections import Counter

    import lungxray.data as data

    reads, stats = Counter(), []
    read, status = data.read_image_file, os.stat
    monkeypatch.setattr(data, "read_image_file", lambda path: reads.update([str(path)]) or read(path))
    prep = Preprocessing(img_size=16, crop_borders=True, equalize="clahe")
    cfg = DataConfig(prep, cache_dir=cache_dir, workers=1)  # decoded in this process, where reads are counted
    ds = load_dataset(flat_tree, cfg, progress=False)
    assert len(reads) == 36 and set(reads.values()) == {1}
    folders = {p.parent.name for p in cache_dir.rglob("*.u8") if not p.name.startswith("stack-")}
    assert folders == {"v3-gray-bilinear-16", "v3-gray-bilinear-16-crop-clahe"}
    for i in (0, 20):
        assert np.array_equal(ds.images[i], decode(ds.samples[i].path.read_bytes(), prep))
    monkeypatch.setattr(os, "stat", lambda path, *a, **kw: stats.append(os.fspath(path)) or status(path, *a, **kw))
    again = load_dataset(flat_tree, cfg, progress=False)
    monkeypatch.undo()
    assert sum(reads.values()) == 36 and np.array_equal(np.asarray(again.images), np.asarray(ds.images))
    cached_images = [p for p in stats if p.startswith(str(cache_dir)) and not os.path.basename(p).startswith("stack-")]
    assert cached_images == []


def test_a_damaged_cached_image_is_decoded_again_by_the_next_scan(flat_tree, cache_dir):
    """An image in the cache cut short behind the scan's back (its stack gone too): the scan that
    needs it says so and removes it, and the next scan decodes the film again."""
    cfg = DataConfig(Preprocessing(img_size=16), cache_dir=cache_dir)
    first = load_dataset(flat_tree, cfg, progress=False)
    [stack] = cache_dir.rglob("stack-*.u8")
    stack.unlink()
    damaged = stack.parent / f"{first.samples[3].sha256}.u8"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(DataError, match="damaged") as info:
        load_dataset(flat_tree, cfg, progress=False)
    assert "run it again" in info.value.hint and not damaged.exists()
    again = load_dataset(flat_tree, cfg, progress=False)
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    assert damaged.stat().st_size == 16 * 16
