"""ONNX export, the web service and its upload page, driven with real X-rays and hostile uploads."""

from __future__ import annotations

import datetime
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip, cli, png_bomb, settings, write_tree
from fastapi.testclient import TestClient
from helpers import figure_size
from PIL import Image

from lungxray.bundle import BundleExtras, save_bundle
from lungxray.config import DataConfig, Preprocessing, ServeTimeouts
from lungxray.data import load_dataset
from lungxray.infer import to_tensor
from lungxray.models import get_spec
from lungxray.onnx_export import export_onnx
from lungxray.ood import fit_ood
from lungxray.predictor import Predictor
from lungxray.saliency import PANEL
from lungxray.serve import create_app, uvicorn_options
from lungxray.train import FitData, fit
from lungxray.version import __version__

SIZE = 64


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    """A small CNN trained briefly on 12 real X-rays per class, its bundle with model.onnx, and real files."""
    root = tmp_path_factory.mktemp("serve")
    data = root / "slice"
    files = []
    for folder in sorted((shared_data / "train").iterdir()):
        (data / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:12]:
            (data / folder.name / image.name).symlink_to(image)
            files.append(image)
    ds = load_dataset(data, DataConfig(Preprocessing(img_size=SIZE), cache_dir=root / "cache"), progress=False)
    x, y = to_tensor(ds.images), torch.from_numpy(ds.labels)
    hp = {**get_spec("cnn").defaults, "width": 8}
    result = fit("cnn", hp, FitData((x, y), (x, y), 3), settings("cnn", hp, epochs=2, augment=False))
    bundle = root / "model"
    save_bundle(
        bundle,
        result.model,
        {
            "classes": ds.classes,
            "model": {"name": "cnn", "hyperparameters": hp, "input_shape": [1, SIZE, SIZE]},
            "preprocessing": {"img_size": SIZE},
        },
    )
    path, gap = export_onnx(bundle, ds.images)
    return bundle, ds, files, gap


@pytest.fixture(scope="module")
def real_ood(real, tmp_path_factory):
    """The same model saved with an out-of-distribution score fitted on its images (``real``'s bundle
    has none: it stands for a bundle from before lungxray fitted one)."""
    bundle, ds, files, _ = real
    predictor = Predictor(bundle, backend="torch")
    folder = tmp_path_factory.mktemp("serve_ood") / "model"
    config = {k: predictor.config_[k] for k in ("classes", "model", "preprocessing")}
    save_bundle(folder, predictor.model_, config, BundleExtras(ood=fit_ood(ds.images[::2], ds.images[1::2])))
    return folder, ds, files


def test_onnx_runtime_agrees_with_pytorch_on_real_images(real):
    bundle, ds, _, gap = real
    assert gap < 1e-4
    onnx, eager = Predictor(bundle), Predictor(bundle, backend="torch")
    assert onnx.backend_ == "onnx" and eager.backend_ == "torch"
    a, b = onnx.predict_arrays(ds.images), eager.predict_arrays(ds.images)
    assert np.abs(a - b).max() < 1e-4 and np.array_equal(a.argmax(1), b.argmax(1))
    # model.onnx is under the bundle's checksums: an altered graph is refused
    import json

    assert "model.onnx" in json.loads((bundle / "checksums.json").read_text())


def test_predict_explain_model_health_on_a_real_xray(real):
    bundle, _, files, _ = real
    with TestClient(create_app(bundle)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        info = client.get("/model").json()
        assert info["classes"] == ["covid", "normal", "viral_pneumonia"] and info["backend"] == "onnx"
        answer = client.post("/predict", files={"file": (files[0].name, files[0].read_bytes(), "image/jpeg")})
        assert answer.status_code == 200
        body = answer.json()
        assert body["class"] in info["classes"] and body["model"] == "cnn"
        assert body["ood_score"] is None and body["in_distribution"] is None  # a bundle without the score
        assert info["ood"] is None and info["headline"] is None  # a bundle saved without them
        created = json.loads((bundle / "config.json").read_text())["created"]
        assert (
            body["model_context"]
            == info["model_context"]
            == {
                "name": f"{bundle.parent.name} (cnn)",  # the run folder's name, the bundle being its model/
                "version": __version__,
                "trained": created[:10],
                "data": "data sources not recorded",
                "measured": None,
                "card": None,
            }
        )
        today = datetime.datetime.now(datetime.UTC).date()
        assert abs(datetime.date.fromisoformat(created[:10]) - today).days <= 1  # the day it was saved
        assert client.get("/model/card").status_code == 404
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        expected = Predictor(bundle).predict_files([files[0]])[0]["probabilities"]
        assert body["probabilities"] == pytest.approx(expected, abs=1e-6)
        picture = client.post("/explain", files={"file": (files[0].name, files[0].read_bytes(), "image/jpeg")})
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(picture.content)) as img, Image.open(files[0]) as film:
            (width, height), (expected_width, expected_height) = img.size, figure_size(*film.size)
            # the film's own aspect ratio, give or take the rounding of two downscales
            assert width == expected_width and abs(height - expected_height) <= 1
            assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 50
        assert "/predict" in client.get("/openapi.json").json()["paths"]
        assert '<input id="file"' in client.get("/").text


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_the_service_flags_an_image_unlike_the_training_films(real_ood):
    bundle, _, files = real_ood
    with TestClient(create_app(bundle)) as client:
        assert client.get("/model").json()["ood"]["method"] == "input-mahalanobis-v1"
        film = client.post("/predict", files={"file": ("film.jpeg", files[0].read_bytes(), "image/jpeg")}).json()
        assert film["in_distribution"] is True and 0 < film["ood_score"] <= 1
        expected = Predictor(bundle).predict_files([files[0]])[0]
        assert film["ood_score"] == pytest.approx(expected["ood_score"], rel=1e-9)
        flat = _png_bytes(np.full((300, 300), 128, dtype=np.uint8))
        blank = client.post("/predict", files={"file": ("flat.png", flat, "image/png")}).json()
        assert blank["in_distribution"] is False and blank["ood_score"] > 1
        inverted = 255 - np.asarray(Image.open(files[0]).convert("L"))
        upside = client.post("/predict", files={"file": ("inv.png", _png_bytes(inverted), "image/png")}).json()
        assert upside["in_distribution"] is False


def _hostile_uploads(real_bytes: bytes, png_bytes: bytes) -> list[tuple[str, bytes]]:
    """At least 200 generated malformed uploads, each one unreadable by construction."""
    rng = np.random.default_rng(0)
    cases = [("empty", b"")]
    for n in np.linspace(1, len(real_bytes) - 400, 70).astype(int):  # JPEG cut short, before its end marker
        cases.append((f"truncated-jpeg-{n}", real_bytes[:n]))
    for k in range(40):  # bit flips in the PNG signature and header chunk, which carry a checksum
        data = bytearray(png_bytes)
        position = int(rng.integers(0, 33))
        data[position] ^= 1 << int(rng.integers(0, 8))
        cases.append((f"bitflip-png-header-{k}", bytes(data)))
    for k in range(40):  # wrong magic bytes: a real file's body behind another format's signature
        magic = [b"%PDF-1.7\n", b"PK\x03\x04", b"GIF89a", b"\x7fELF", b"<html>"][k % 5]
        cases.append((f"wrong-magic-{k}", magic + real_bytes[len(magic) + k :]))
    for k in range(30):  # random noise of various sizes
        cases.append((f"noise-{k}", rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()))
    for k in range(20):  # decompression bombs: headers declaring huge dimensions
        cases.append((f"bomb-{k}", png_bomb()))
    cases.append(("cmyk-renamed-text", b"this is not an image at all"))
    return cases


def test_fuzz_every_hostile_upload_gets_a_4xx_and_the_server_stays_healthy(real):
    bundle, _, files, _ = real
    real_bytes = files[0].read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(buf, format="PNG")
    cases = _hostile_uploads(real_bytes, buf.getvalue())
    limit = 2 * len(real_bytes)  # small enough to send oversized files quickly, large enough for the real one
    cases += [(f"oversized-{k}", b"\xff\xd8\xff" + bytes(limit + 1000 * (k + 1))) for k in range(5)]
    assert len(cases) >= 200
    with TestClient(create_app(bundle, max_upload_bytes=limit), raise_server_exceptions=False) as client:
        for name, data in cases:
            for route in ("/predict",) if not name.startswith("bitflip") else ("/predict", "/explain"):
                answer = client.post(route, files={"file": (f"{name}.png", data, "image/png")})
                assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:200])
                detail = answer.json()["detail"]
                assert isinstance(detail, str) and "Traceback" not in detail, name
                if name.startswith("oversized"):
                    assert answer.status_code == 413 and "limit" in detail
        assert client.post("/predict", files={"file": ("x.jpg", real_bytes, "image/jpeg")}).status_code == 200
        assert client.get("/health").json() == {"status": "ok"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(page, expression: str, seconds: float = 30.0):
    """Poll ``expression`` in the page until truthy (wait_for_function evaluates a string, which the
    page's CSP forbids)."""
    for _ in range(int(seconds * 10)):
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{expression} stayed false for {seconds} s")


def _tab_to(page, element_id: str, presses: int = 8) -> None:
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == element_id:
            return
    raise AssertionError(f"Tab never reached #{element_id}")


def _choose_with_keyboard(page, path: Path) -> None:
    """Tab to the page's button, Enter, and pick ``path`` in the file chooser that opens."""
    page.evaluate("document.activeElement.blur()")
    _tab_to(page, "choose")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(path))


LAYOUT = """() => {
  const boxes = ["h1", "#intro", "#drop", "#status", "#error", "#ood", "#answer", "#overlay"]
    .map(s => document.querySelector(s)).filter(e => e && e.offsetParent !== null)
    .map(e => [e.id || e.tagName, e.getBoundingClientRect()]);
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, p] = boxes[i], [b, q] = boxes[j];
    const apart = p.right - 1 <= q.left || q.right - 1 <= p.left || p.bottom - 1 <= q.top || q.bottom - 1 <= p.top;
    if (!apart) overlaps.push(a + "/" + b);
  }
  return {overlaps, scroll: document.documentElement.scrollWidth - window.innerWidth, shown: boxes.length};
}"""


@pytest.mark.browser
@pytest.mark.processes
def test_upload_page_from_the_keyboard_empty_error_flagged_and_over_limit_states(real_ood, tmp_path):
    sync_playwright = browser_or_skip()
    bundle, _, files = real_ood
    flat = tmp_path / "flat.png"
    flat.write_bytes(_png_bytes(np.full((300, 300), 128, dtype=np.uint8)))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    big = tmp_path / "big.png"  # noise does not compress: over the limit set below
    big.write_bytes(_png_bytes(np.random.default_rng(0).integers(0, 256, (1600, 1600), dtype=np.uint8)))
    limit = max(p.stat().st_size for p in files[:1]) + 100_000
    assert big.stat().st_size > limit
    server, thread, url = _running_server(bundle, "auto", max_upload_bytes=limit)
    posts, outside = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            # Playwright turns the browser's file-chooser interception on when the page gets its first
            # listener and off when the last goes, in messages it does not wait for; expect_file_chooser
            # alone adds and drops one each time, and an Enter that beats the message opens the
            # browser's own chooser, which raises no event. A listener kept from the start keeps the
            # interception on for the whole test.
            page.on("filechooser", lambda chooser: None)
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
            page.goto(url + "/")
            # empty: nothing but the chooser until a result arrives
            empty = {s: page.is_visible(s) for s in ("#result", "#error", "#ood", "#overlay")}
            assert page.get_attribute("#status", "aria-live") == "polite"
            # a real film, from the keyboard alone: Tab to the button, Enter, choose
            _choose_with_keyboard(page, files[0])
            _wait(page, "document.getElementById('overlay').naturalWidth")
            announced = page.inner_text("#status")
            shown = page.inner_text("#class")
            overlay_size = page.evaluate("[overlay.naturalWidth, overlay.naturalHeight]")
            layouts = {}
            for width in (1366, 390):
                page.set_viewport_size({"width": width, "height": 900})
                layouts[width] = page.evaluate(LAYOUT)
            page.screenshot(path=str(tmp_path / "upload-390.png"), full_page=True)
            # a file that is not an image: the error, and nothing of the earlier result
            _choose_with_keyboard(page, text)
            _wait(page, "!document.getElementById('error').hidden")
            after_error = (page.inner_text("#error"), page.is_visible("#result"), page.inner_text("#class"))
            # an image unlike the training films: a plain warning instead of a verdict
            _choose_with_keyboard(page, flat)
            _wait(page, "!document.getElementById('ood').hidden")
            warning, result_after = page.inner_text("#ood"), page.is_visible("#result")
            # over the limit: refused in the page, never sent
            sent_before = len(posts)
            _choose_with_keyboard(page, big)
            _wait(page, "!document.getElementById('error').hidden")
            refused = page.inner_text("#error")
            time.sleep(0.5)
            sent_after = len(posts)
            browser.close()
    finally:
        _stop(server, thread)
    assert not any(empty.values()), empty
    assert shown in ("covid", "normal", "viral_pneumonia") and announced.startswith(f"{files[0].name}: {shown} (")
    with Image.open(files[0]) as film:
        assert overlay_size[0] == round(film.width * PANEL / max(film.size))  # the overlay half alone
    for width, layout in layouts.items():
        assert layout["overlaps"] == [] and layout["scroll"] <= 0 and layout["shown"] >= 5, (width, layout)
    assert after_error[0].startswith("'notes.txt' is not an image lungxray can read") and "Pillow" not in after_error[0]
    assert not after_error[1] and after_error[2] == ""
    assert warning.startswith("No answer") and not result_after
    assert "over the" in refused and "limit" in refused and sent_after == sent_before
    assert errors == [] and outside == []
    assert (tmp_path / "upload-390.png").stat().st_size > 10_000


@pytest.mark.browser
@pytest.mark.processes
def test_docs_and_redoc_render_offline(real):
    """/docs and /redoc load Swagger UI and ReDoc from the service itself: no request leaves the machine."""
    sync_playwright = browser_or_skip()
    bundle = real[0]
    server, thread, url = _running_server(bundle, "auto")
    requested, blocked = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.on("request", lambda r: requested.append(r.url))
            page.on("requestfailed", lambda r: blocked.append(r.url) if r.failure == "csp" else None)
            page.goto(url + "/docs")
            page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
            swagger = page.inner_text(".swagger-ui")
            page.goto(url + "/redoc")
            page.wait_for_selector("text=/predict", timeout=30_000)
            redoc = page.inner_text("body")
            browser.close()
    finally:
        _stop(server, thread)
    assert "/predict" in swagger and "/explain" in swagger
    assert "lungxray" in redoc and "/predict" in redoc
    # ReDoc asks for its maker's logo on a CDN; the page's CSP stops it in the browser, unsent.
    outside = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
    assert all(u in blocked for u in outside), outside
    assert any(u.endswith("swagger-ui-bundle.js") for u in requested)


@pytest.mark.processes
def test_an_over_limit_body_gets_its_413_whatever_the_client(real):
    """urllib sends the whole body before reading (no Expect: 100-continue): the server drains it
    and answers 413, declared length or chunked."""
    import urllib.error
    import urllib.request

    server, thread, url = _running_server(real[0], "auto", max_upload_bytes=1 << 20)
    body = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + bytes(3 << 20)
    body += b"\r\n--x--\r\n"
    answers = []
    try:
        for chunked in (False, True):
            data = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
            headers = {"Content-Type": "multipart/form-data; boundary=x"}
            if chunked:
                headers["Transfer-Encoding"] = "chunked"
            request = urllib.request.Request(url + "/predict", data=data, headers=headers, method="POST")
            try:
                urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as exc:
                answers.append((exc.code, json.loads(exc.read())["detail"]))
        health = urllib.request.urlopen(url + "/health", timeout=10).status
    finally:
        _stop(server, thread)
    assert answers == [(413, "upload larger than the 1 MB limit")] * 2 and health == 200


def test_an_ensemble_bundle_round_trips_through_save_load_predict_onnx_explain_and_serve(real, tmp_path):
    """--members 2: one bundle whose output is the mean of its members' probabilities."""
    from lungxray.saliency import saliency

    _, ds, files, _ = real
    x, y = to_tensor(ds.images), torch.from_numpy(ds.labels)
    hp = {**get_spec("cnn").defaults, "width": 8}
    result = fit("cnn", hp, FitData((x, y), (x, y), 3), settings("cnn", hp, epochs=1, augment=False, members=2))
    assert result.member_epochs is not None and len(result.member_epochs) == 2
    with torch.no_grad():
        members = [torch.softmax(m(x[:6]), dim=1) for m in result.model.members]
        assert torch.allclose(torch.softmax(result.model(x[:6]), dim=1), (members[0] + members[1]) / 2, atol=1e-6)
    bundle = tmp_path / "ensemble"
    config = {"classes": ds.classes, "model": {"name": "cnn", "members": 2, "hyperparameters": hp,
              "input_shape": [1, SIZE, SIZE]}, "preprocessing": {"img_size": SIZE}}  # fmt: skip
    save_bundle(bundle, result.model, config)
    loaded = Predictor(bundle, backend="torch")
    expected = ((members[0] + members[1]) / 2).numpy()
    assert np.allclose(loaded.predict_arrays(ds.images[:6]), expected, atol=1e-5)
    path, gap = export_onnx(bundle, ds.images)
    assert gap < 1e-4 and Predictor(bundle).backend_ == "onnx"
    maps = saliency(loaded, ds.images[:2])  # the members' Grad-CAM maps, averaged
    assert maps.shape == (2, SIZE, SIZE) and maps.max() > maps.min()
    with TestClient(create_app(bundle)) as client:
        answer = client.post("/predict", files={"file": ("x.jpeg", files[0].read_bytes(), "image/jpeg")}).json()
        assert set(answer["probabilities"]) == set(ds.classes)
        assert (
            client.post("/explain", files={"file": ("x.jpeg", files[0].read_bytes(), "image/jpeg")}).status_code == 200
        )


def _running_server(bundle, backend: str, timeouts: ServeTimeouts | None = None, **options):
    """A uvicorn server for ``bundle`` on a free loopback port, in a thread, its connections held to
    ``timeouts`` (None: the defaults) as `lungxray serve` holds them: (server, thread, url). The caller stops it in a
    finally block (``_stop``); one that does not start in 10 s is stopped here."""
    import uvicorn

    port = _free_port()
    app = create_app(bundle, backend, **options)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(timeouts or ServeTimeouts())
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    if not server.started:
        _stop(server, thread)
        pytest.fail(f"the test server did not start on 127.0.0.1:{port} within 10 s")
    return server, thread, f"http://127.0.0.1:{port}"


def _stop(server, thread) -> None:
    """Stop a ``_running_server`` and wait for its thread."""
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
@pytest.mark.processes
def test_explanations_beside_a_stream_of_predictions_are_the_reference(real):
    """200 mixed /predict and /explain requests, 8 at a time, on the torch backend (where
    predictions and explanations share a model): every overlay equals the one made alone, every
    prediction the one made alone: predictions and explanations never share Grad-CAM's hooks."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    bundle, _, files, _ = real
    server, thread, url = _running_server(bundle, "torch")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            upload = lambda name: {"file": ("x.jpeg", files[name].read_bytes(), "image/jpeg")}  # noqa: E731
            reference = {k: client.post("/explain", files=upload(k)).content for k in (0, 20)}
            expected = {k: client.post("/predict", files=upload(k)).json() for k in (0, 20)}
            jobs = [("/explain" if i % 4 == 0 else "/predict", 0 if i % 3 else 20) for i in range(200)]

            def send(job):
                path, k = job
                return job, client.post(path, files=upload(k))

            with ThreadPoolExecutor(max_workers=8) as pool:
                answers = list(pool.map(send, jobs))
    finally:
        _stop(server, thread)
    assert all(r.status_code == 200 for _, r in answers)
    # the race needs an unlucky interleaving; its cause is checkable every time: after an
    # explanation, the model that serves predictions holds no Grad-CAM hook
    from lungxray.saliency import saliency

    predictor = Predictor(bundle, backend="torch")
    saliency(predictor, predictor.decode_files([files[0]])[1])
    hooked = [n for n, m in predictor.model_.named_modules() if m._forward_hooks or m._backward_hooks]
    assert hooked == [] and predictor.explainer_ is not predictor.model_
    overlays = [(k, r.content) for (path, k), r in answers if path == "/explain"]
    assert len(overlays) == 50 and all(content == reference[k] for k, content in overlays)
    assert all(r.json() == expected[k] for (path, k), r in answers if path == "/predict")


def test_the_service_sends_security_headers_and_refuses_foreign_hosts(real):
    """Every answer carries the security headers, and a Host header outside the allowed names is
    refused (DNS rebinding)."""
    from lungxray.serve import default_allowed_hosts

    bundle = real[0]
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "::1", "[::1]"]
    assert default_allowed_hosts("0.0.0.0") == ["*"]
    with TestClient(create_app(bundle, allowed_hosts=default_allowed_hosts("127.0.0.1"))) as client:
        refused = client.get("/health", headers={"Host": "rebound.example"})
        assert refused.status_code == 400 and refused.headers["X-Content-Type-Options"] == "nosniff"
        ok = client.get("/health", headers={"Host": "127.0.0.1:8000"})
        assert ok.status_code == 200
        assert ok.headers["X-Content-Type-Options"] == "nosniff" and ok.headers["X-Frame-Options"] == "DENY"
        page = client.get("/", headers={"Host": "localhost"})
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_only_regular_image_files_of_sane_size_are_read(real, tmp_path):
    """A FIFO and /dev/zero are refused as not regular files (reading them would hang or fill the
    memory), and a small PNG declaring 9400 x 9400 16-bit pixels (about 700 MB decoded) is refused
    before it is decoded."""
    import os
    import struct
    import zlib

    from lungxray.decode import decode
    from lungxray.errors import UnusableImage

    predictor = Predictor(real[0])
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    results = predictor.predict_files([fifo, Path("/dev/zero"), real[2][0]])
    assert [("error" in r) for r in results] == [True, True, False]
    assert all("not a regular file" in r["error"] for r in results[:2])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 9400, 9400, 16, 0, 0, 0, 0)  # 16-bit grayscale
    big = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    with pytest.raises(UnusableImage, match="9400 x 9400 pixels"):
        decode(big, Preprocessing(img_size=64))


def _leads_against_chance(row: dict, metrics: dict) -> None:
    """A headline row of ``metrics``: balanced accuracy first, beside always answering the majority
    class, then each class's recall, and each defined one-vs-rest AUROC beside 0.5, called no
    better than chance when its interval includes 0.5."""
    base = metrics["baseline"]
    first, rest = row["figures"].split("; macro-F1 ", 1)
    assert first.startswith(f"balanced accuracy {metrics['balanced_accuracy']:.2f} (")
    assert first.endswith(f"always answering {base['majority_class']}: {base['balanced_accuracy']:.2f})")
    recall, _, auroc = rest.split("; recall ", 1)[1].partition("; one-vs-rest AUROC (chance: 0.50) ")

    def shown(c: str, key: str) -> str:  # as the row shows it: the value, then its interval when there is one
        value, ci = metrics["per_class"][c][key], metrics["ci95"].get(f"{key}/{c}")
        return f"{c} {value:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")

    present = [c for c, m in metrics["per_class"].items() if m["support"]]
    assert recall.split(", ") == [shown(c, "recall") for c in present]
    defined = [c for c in present if metrics["per_class"][c]["auroc"] is not None]
    verdicts = []
    for c in defined:
        ci = metrics["ci95"].get(f"auroc/{c}")
        verdicts.append("" if ci is None else ": no better than chance" if ci[0] <= 0.5 <= ci[1] else
                        f": {metrics['per_class'][c]['auroc_vs_chance']}")  # fmt: skip
    assert auroc.split(", ") == [shown(c, "auroc") + v for c, v in zip(defined, verdicts, strict=True)]


def test_model_leads_with_the_test_figures_against_chance(trained_run):
    _, run, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    with TestClient(create_app(run / "model")) as client:
        info = client.get("/model").json()
    assert info["metrics"] == metrics  # the test split's metrics.json, stored in the bundle
    assert [row["label"] for row in info["headline"]] == [f"test split ({metrics['n']} images)"]
    _leads_against_chance(info["headline"][0], metrics)
    assert "headline.json" in json.loads((run / "model" / "checksums.json").read_text())  # verified on load


@pytest.mark.slow  # a whole run on two sites with an external set
def test_model_leads_with_the_worst_site_and_each_external_set_against_chance(tmp_path):
    sites = [write_tree(tmp_path / "north", per_class=8), write_tree(tmp_path / "south", per_class=8, start=40)]
    elsewhere = write_tree(tmp_path / "elsewhere", per_class=6, start=300, classes={0: "covid", 1: "normal"})
    out = tmp_path / "run"
    flags = "--trials 1 --epochs 2 --quiet --model mlp --seed 3 --img-size 16 --cache-dir"
    assert cli("run", *sites, "--out", out, "--external", elsewhere, flags, tmp_path / "cache") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    external = json.loads((out / "external" / "elsewhere" / "metrics.json").read_text())
    worst = metrics["worst_site"]
    with TestClient(create_app(out / "model")) as client:
        info = client.get("/model").json()
    rows = info["headline"]
    assert [row["label"] for row in rows] == [
        f"test split ({metrics['n']} images)",
        f"worst site: {worst} ({metrics['per_site'][worst]['n']} images, of 2 sites)",
        "elsewhere (external, 12 images)",
    ]
    for row, figures in zip(rows, [metrics, metrics["per_site"][worst], external], strict=True):
        _leads_against_chance(row, figures)
        recalls = {c: m["recall"] for c, m in figures["per_class"].items() if m["support"]}
        lowest = min(recalls, key=recalls.get)
        assert row["balanced_accuracy"] == figures["balanced_accuracy"]
        assert row["lowest_recall"] == {"class": lowest, "recall": recalls[lowest]}
    # every answer's one line: the test, then the worse of the worst site and the external set
    elsewhere = min(rows[1:], key=lambda row: row["balanced_accuracy"])
    internal, worse = info["model_context"]["measured"].split("; worst elsewhere, ")
    assert internal.startswith(f"{rows[0]['label']}: balanced accuracy {metrics['balanced_accuracy']:.2f} (")
    assert worse.startswith(f"{elsewhere['label']}: balanced accuracy {elsewhere['balanced_accuracy']:.2f} (")
    assert worse.endswith(
        f"lowest recall {elsewhere['lowest_recall']['class']} {elsewhere['lowest_recall']['recall']:.2f}"
    )
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert f"- {rows[1]['label']}: {rows[1]['figures']}." in card  # the card's own lines


def _closed_after(port: int, at_once: bytes, trickled: bytes, limit: float = 15.0) -> float:
    """Seconds until the server closes a loopback connection that sends ``at_once``, then
    ``trickled`` a byte every 0.2 s, then nothing; ``limit`` when it is still open then."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as conn:
        try:
            conn.sendall(at_once)
            for k in range(len(trickled)):
                conn.sendall(trickled[k : k + 1])
                time.sleep(0.2)
            while conn.recv(4096):  # an answer, if any, then the close
                pass
        except TimeoutError:
            return limit
        except (BrokenPipeError, ConnectionResetError):  # closed while the client was still sending
            pass
    return time.monotonic() - start


@pytest.mark.processes
def test_idle_and_stalled_connections_are_closed_within_their_timeouts(tmp_path):
    """A real server on 127.0.0.1 closes a connection that sends nothing (keep-alive), one whose
    headers stop half-way or come a byte at a time (header), one that sends its headers and then
    stalls or trickles its body (body), and an idle one after an answer (keep-alive), each at its
    bound and not before; a bound out of range is refused in one line."""
    from concurrent.futures import ThreadPoolExecutor

    bundle = _tiny_bundle(tmp_path / "model")
    timeouts = ServeTimeouts(keep_alive=1.0, header=2.0, body=3.0)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 30
    post = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    post += b"Content-Length: 4000\r\n\r\n"
    cases = {  # sent at once, sent a byte at a time, the bound it meets
        "idle": (b"", b"", timeouts.keep_alive),
        "half a head": (head, b"", timeouts.header),
        "a head a byte at a time": (b"", head, timeouts.header),
        "a head, then no body": (post, b"", timeouts.body),
        "a body a byte at a time": (post, b"--x\r\n" + b"y" * 40, timeouts.body),
        "an answer, then idle": (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"", timeouts.keep_alive),
    }
    server, thread, url = _running_server(bundle, "torch", timeouts=timeouts)
    try:
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(len(cases)) as pool:  # side by side: a few seconds in all
            times = pool.map(lambda case: _closed_after(port, *case[:2]), cases.values())
            closed = dict(zip(cases, times, strict=True))
    finally:
        _stop(server, thread)
    for name, (_, _, bound) in cases.items():
        assert bound - 0.3 <= closed[name] <= bound + 2.0, (name, closed[name], bound)
    for flag in ("--keep-alive-timeout", "--header-timeout", "--body-timeout"):
        assert cli("serve", bundle, flag, "0") == 2


def _tiny_bundle(folder: Path) -> Path:
    """An untrained two-class MLP on 16 px images, saved to ``folder``: a service that starts at once."""
    from lungxray.models import create_model

    hp = dict(get_spec("mlp").defaults)
    return save_bundle(folder, create_model("mlp", (1, 16, 16), 2, **hp), {"classes": ["a", "b"],
                       "model": {"name": "mlp", "hyperparameters": hp, "input_shape": [1, 16, 16]},
                       "preprocessing": {"img_size": 16}})  # fmt: skip


def test_the_openapi_schema_types_every_answer_and_describes_every_path(tmp_path):
    """/docs and /redoc show each endpoint's purpose and the fields of its answer, not ``{ }``."""
    with TestClient(create_app(_tiny_bundle(tmp_path / "model"))) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for verb, operation in operations.items():
            assert len(operation.get("description", "")) > 20 and operation.get("summary"), (verb, path)
    answers = {}
    for path, verb in (("/predict", "post"), ("/model", "get"), ("/health", "get")):
        ref = spec["paths"][path][verb]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        answers[path] = schemas[ref.rsplit("/", 1)[1]]["properties"]
    assert {"class", "probabilities", "ood_score", "in_distribution", "model", "model_context"} <= set(
        answers["/predict"]
    )
    assert {"classes", "model", "backend", "headline", "metrics", "model_card", "model_context"} <= set(
        answers["/model"]
    )
    assert set(answers["/health"]) == {"status"}
    context = schemas["ModelContext"]["properties"]
    assert set(context) == {"name", "version", "trained", "data", "measured", "card"}
    assert all(field.get("description") for field in [*context.values(), *answers["/predict"].values()]
               if "$ref" not in field)  # fmt: skip
    for code in ("413", "422"):  # a refused upload: {"detail": "..."} that names the file
        assert spec["paths"]["/predict"]["post"]["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"
        }
    explain = spec["paths"]["/explain"]["post"]
    assert [q["schema"]["enum"] for q in explain["parameters"] if q["name"] == "panel"] == [
        ["figure", "read", "overlay"]
    ]


def test_an_unreadable_upload_is_named_and_says_what_to_do_without_a_library_name(tmp_path, real):
    """Whatever breaks the decoder, the 422 names the uploaded file (its last path part) and says
    what to upload; it never names the library that failed to read it."""
    real_bytes = real[2][0].read_bytes()
    noise_png = _png_bytes(np.random.default_rng(1).integers(0, 256, (60, 60), dtype=np.uint8))
    uploads = {
        "scan.txt": b"this is a text file, not an X-ray",
        "C:\\Users\\me\\film.png": noise_png[: len(noise_png) // 2],  # cut short
        "cut.jpeg": real_bytes[: len(real_bytes) // 3],
        "noise.dcm": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "empty.png": b"",
    }
    with TestClient(create_app(_tiny_bundle(tmp_path / "model"))) as client:
        details = {}
        for name, data in uploads.items():
            for route in ("/predict", "/explain?panel=overlay"):
                answer = client.post(route, files={"file": (name, data, "application/octet-stream")})
                assert answer.status_code == 422, (name, route, answer.text)
                details[name, route] = answer.json()["detail"]
    assert details["scan.txt", "/predict"] == (
        "'scan.txt' is not an image lungxray can read (PNG, JPEG, DICOM, ...): upload a chest X-ray image file"
    )
    assert details["empty.png", "/predict"].startswith("'empty.png' cannot be used: empty file (zero bytes).")
    for (name, route), detail in details.items():
        shown = name.rsplit("\\", 1)[-1]
        assert detail.startswith(f"'{shown}' "), (name, route, detail)
        assert "upload" in detail.lower(), detail
        assert not any(word in detail for word in ("Pillow", "PIL", "Traceback", "C:")), detail


def test_measured_line_is_the_internal_test_and_the_worst_elsewhere():
    """One line: the first row, then the other row of lowest balanced accuracy, each with its
    first figure (whose interval holds a "; ") and lowest recall; rows written without the numbers
    give their first figure, the first of them counting as the worst."""
    from lungxray.serve_schema import measured_line

    def row(label: str, balanced: float | None, lowest: tuple[str, float] | None) -> dict:
        figures = f"balanced accuracy {balanced or 0.5:.2f} (0.40-0.90; always answering covid: 0.33); macro-F1 0.50"
        if lowest is None:  # a row written before the rows carried numbers
            return {"label": label, "figures": figures}
        return {"label": label, "figures": figures, "balanced_accuracy": balanced,
                "lowest_recall": {"class": lowest[0], "recall": lowest[1]}}  # fmt: skip

    test, site = (
        row("test split (40 images)", 0.83, ("normal", 0.71)),
        row("worst site: b (9 images, of 2 sites)", 0.6, ("covid", 0.5)),
    )
    far = row("hospital-c (external, 30 images)", 0.41, ("normal", 0.14))
    assert measured_line([test, site, far]) == (
        "test split (40 images): balanced accuracy 0.83 (0.40-0.90; always answering covid: 0.33), lowest recall "
        "normal 0.71; worst elsewhere, hospital-c (external, 30 images): balanced accuracy 0.41 (0.40-0.90; always "
        "answering covid: 0.33), lowest recall normal 0.14"
    )
    assert measured_line([test]).endswith("; never measured on another site's or hospital's films")
    held_out = row("held-out site b (9 images, none of its films in training)", 0.52, ("normal", 0.2))
    assert measured_line([held_out]) == (  # a site it never trained on is such a measurement: said as one
        "held-out site b (9 images, none of its films in training): balanced accuracy 0.52 (0.40-0.90; always "
        "answering covid: 0.33), lowest recall normal 0.20"
    )
    old = [row("test split (40 images)", None, None), row("a (external, 5 images)", None, None), row("b", None, None)]
    assert measured_line(old).split("; worst elsewhere, ")[1] == (
        "a (external, 5 images): balanced accuracy 0.50 (0.40-0.90; always answering covid: 0.33)"
    )
    assert measured_line(None) is None and measured_line([]) is None


def test_every_prediction_names_its_model_and_the_service_serves_its_card(trained_run):
    """A run's bundle: /predict carries the model's name, version, training day, data and measured
    line (its own test figures, and that it was never measured elsewhere), and /model/card serves
    the card under that name."""
    data, run, _ = trained_run
    config = json.loads((run / "model" / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    film = next((data / "Covid").iterdir())
    with TestClient(create_app(run / "model")) as client:
        answer = client.post("/predict", files={"file": (film.name, film.read_bytes(), "image/png")}).json()
        info = client.get("/model").json()
        card = client.get(answer["model_context"]["card"])
    context = answer["model_context"]
    sizes = config["training"]["split_sizes"]
    recalls = {c: m["recall"] for c, m in metrics["per_class"].items() if m["support"]}
    lowest = min(recalls, key=recalls.get)
    assert context == info["model_context"] and answer["model"] == config["model"]["name"]
    assert context["name"] == f"run ({config['model']['name']})" and context["version"] == __version__
    assert context["trained"] == config["created"][:10]
    assert (
        context["data"] == f"{sizes['train']} training and {sizes['val']} validation images; data sources not recorded"
    )
    assert context["measured"] == (
        f"test split ({metrics['n']} images): {info['headline'][0]['figures'].split(')')[0]}), lowest recall "
        f"{lowest} {recalls[lowest]:.2f}; never measured on another site's or hospital's films"
    )
    assert context["measured"].startswith(f"test split ({metrics['n']} images): balanced accuracy "
                                          f"{metrics['balanced_accuracy']:.2f} (")  # fmt: skip
    assert context["card"] == "/model/card"  # relative: right behind a proxy too
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/html")
    assert f"<title>Model card: {context['name']}</title>" in card.text
    assert f"trained {context['trained']}" in card.text and "## Intended use" in card.text
    assert "default-src 'none'" in card.headers["Content-Security-Policy"]


@pytest.fixture(scope="module")
def carded(real_ood, shared_data, tmp_path_factory):
    """``real_ood``'s model as run chest-2024 leaves it: its card and headline, measured on its own
    films (the internal test) and on 18 films of the dataset's test folder (an external set)."""
    import shutil

    from lungxray.card import headline, model_card, write_card
    from lungxray.metrics import compute_metrics

    bundle, ds, files = real_ood
    root = tmp_path_factory.mktemp("carded")
    folder = shutil.copytree(bundle, root / "chest-2024" / "model")
    elsewhere = root / "hospital-b"
    for classes in sorted((shared_data / "test").iterdir()):
        (elsewhere / classes.name).mkdir(parents=True)
        for image in sorted(classes.iterdir())[:6]:
            (elsewhere / classes.name / image.name).symlink_to(image)
    ext = load_dataset(elsewhere, DataConfig(Preprocessing(img_size=SIZE), cache_dir=root / "cache"), progress=False)
    predictor = Predictor(folder)
    metrics = compute_metrics(ds.labels, predictor.predict_arrays(ds.images), ds.classes, resamples=100)
    external = {"hospital-b": compute_metrics(ext.labels, predictor.predict_arrays(ext.images), ext.classes,
                                              resamples=100)}  # fmt: skip
    config = predictor.config_ | {"preprocessing": predictor.preprocessing_.to_json()}  # every setting, as run has
    write_card(folder, model_card(config, ds.summary(), metrics, external), headline(metrics, external))
    return folder, files


@pytest.mark.browser
@pytest.mark.processes
def test_the_page_names_the_model_beside_its_answer_and_stays_legible_from_390_px(carded, tmp_path):
    """At a phone's 390 px and a laptop's 1366 px: beside the answer, the model's name, version,
    training day and its figures on the internal test and on another hospital's films; its card
    opens from there; nothing runs off the side, and the pictures' captions and colour-scale labels
    are page text of at least 12 px."""
    sync_playwright = browser_or_skip()
    bundle, files = carded
    with TestClient(create_app(bundle)) as client:
        context = client.get("/model").json()["model_context"]
    server, thread, url = _running_server(bundle, "auto")
    seen, outside, errors, responses = {}, [], [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            for width in (390, 1366):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on(
                    "request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url)
                )
                page.goto(url + "/")
                page.set_input_files("#file", str(files[0]))
                _wait(
                    page,
                    "document.getElementById('overlay').naturalWidth && document.getElementById('read').naturalWidth",
                )
                seen[width] = page.evaluate(PAGE_STATE)
                page.screenshot(path=str(tmp_path / f"page-{width}.png"), full_page=True)
                responses.clear()  # this width's card only
                page.context.on("response", lambda r: responses.append((r.url, r.status)))
                with page.context.expect_page() as opened:
                    page.click("#answered-by a.card")
                card = opened.value
                card.wait_for_load_state()
                seen[width]["card"] = (card.url, card.inner_text("h1"), card.inner_text("pre")[:200], responses[:])
                card.close()
                page.close()
            browser.close()
    finally:
        _stop(server, thread)
    assert errors == [] and outside == []
    assert "hospital-b (external, 18 images)" in context["measured"] and context["card"].endswith("/model/card")
    for width, state in seen.items():
        about = state["about"]
        assert about.startswith(f"Answered by: {context['name']}, made by lungxray {__version__}, trained "
                                f"{context['trained']}\n"), (width, about)  # fmt: skip
        assert f"Measured: {context['measured']}" in about and state["about_visible"], (width, about)
        assert state["scroll"] <= state["window"], (width, state)  # nothing runs off the side
        assert state["captions"][0] == "As read" and state["captions"][1].startswith("Where the model looked (")
        assert state["captions"][1].endswith(f"for: {state['class']}") and state["labels"] == ["low", "high"]
        assert min(state["fonts"]) >= 12, (width, state["fonts"])
        assert all(0 < w <= state["window"] for w in state["pictures"]), (width, state)
        card_url, heading, text, responses = state["card"]
        assert card_url == f"{url}/model/card" and (card_url, 200) in responses
        assert heading == f"Model card: {context['name']}" and "# Model card: lungxray cnn" in text
    # stacked at 390 px: the overlay below the film as read, each about as wide as the screen
    assert seen[390]["tops"][1] > seen[390]["tops"][0] and min(seen[390]["pictures"]) > 300
    assert seen[1366]["tops"][1] == seen[1366]["tops"][0]  # side by side on a laptop
    assert all((tmp_path / f"page-{width}.png").stat().st_size > 10_000 for width in seen)


PAGE_STATE = """() => {
  const box = document.getElementById("answered-by");
  const texts = sel => [...document.querySelectorAll(sel)].map(e => e.textContent.trim());
  const shown = [...document.querySelectorAll("#explanation figcaption, .scale span:not(.ramp), #answered-by p")];
  const pictures = ["read", "overlay"].map(id => document.getElementById(id).getBoundingClientRect());
  return {
    about: box.innerText.trim(), about_visible: box.offsetParent !== null && box.getBoundingClientRect().height > 0,
    class: document.getElementById("class").textContent,
    scroll: document.documentElement.scrollWidth, window: window.innerWidth,
    captions: texts("#explanation figcaption"), labels: texts(".scale span:not(.ramp)"),
    fonts: shown.map(e => parseFloat(getComputedStyle(e).fontSize)),
    pictures: pictures.map(r => r.width), tops: pictures.map(r => Math.round(r.top)),
  };
}"""
