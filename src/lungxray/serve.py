"""The web service: a FastAPI app built around one ``Predictor``, loaded once at start-up.

``POST /predict`` and ``POST /explain`` take a multipart upload (field ``file``); ``GET /health``,
``GET /model`` and the upload page at ``/``. Inference runs in a worker thread so the event loop
never waits on the model; at most one model call per core runs at a time. Every bad upload gets a
4xx with a message that says what was wrong: too large (413), empty, not an image, truncated, a
decompression bomb, an unsupported mode, a DICOM file that is not a frontal radiograph (422).
DICOM uploads are read as in training (``decode.py``); no patient data comes back.
Holds no training code.
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lungxray.config import ServeTimeouts
from lungxray.errors import UnusableImage
from lungxray.predictor import Predictor

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# An over-limit body is read and dropped up to this many bytes before the 413 goes out: a client
# that sends its whole body before reading (no Expect: 100-continue, as urllib and browsers do)
# otherwise meets a closed connection instead of the answer. Beyond it, the connection is cut.
DRAIN_BYTES = 256 * 1024 * 1024
PAGE = Path(__file__).with_name("upload.html")


def _decode_upload(predictor: Predictor, data: bytes, name: str = "") -> np.ndarray:
    """Upload bytes (a file called ``name``) -> (H, W) uint8 preprocessed image, or a 422 that says why not."""
    try:
        return predictor.decode(data, name=name)
    except UnusableImage as exc:
        raise HTTPException(status_code=422, detail=f"unusable image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a hostile file may break a decoder in any way; never a 500
        raise HTTPException(
            status_code=422, detail=f"could not read the upload as an image ({type(exc).__name__}: {exc})"
        ) from None


async def _read_limited(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes; 413 once it passes ``limit``."""
    chunks, size = [], 0
    while chunk := await file.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=_too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"upload larger than the {limit // (1 << 20)} MB limit"


async def _drain(request: Request, bound: int) -> None:
    """Read and drop the request body, up to ``bound`` bytes."""
    read = 0
    async for chunk in request.stream():
        read += len(chunk)
        if read > bound:
            break


def create_app(
    model_dir: Path,
    backend: str = "auto",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The app for the bundle in ``model_dir``; the model is loaded when the app starts.

    ``allowed_hosts``: the Host headers answered (None: any), so a web page that rebinds its own
    domain to 127.0.0.1 cannot call the service from a browser."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Requests run side by side, one thread each, at most one per core: a request never
        # splits its model call over cores another request is using, and waiting requests queue
        # in order instead of thrashing (BENCHMARKS.md measures the latency at 32 clients).
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        app.state.predictor = Predictor(model_dir, backend=backend, threads=1)
        app.state.limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        app.state.explain_lock = threading.Lock()  # Grad-CAM keeps per-call state in its hooks
        yield
        torch.set_num_threads(threads_before)

    from fastapi_offline import FastAPIOffline

    # /docs and /redoc from the Swagger UI and ReDoc files that fastapi-offline installs, not from
    # a CDN: a hospital network without internet access gets them too.
    app: FastAPI = FastAPIOffline(
        title="lungxray", summary="Chest X-ray classifier: predictions and where the model looked", lifespan=lifespan
    )
    _add_guards(app, max_upload_bytes, allowed_hosts)
    _add_routes(app, max_upload_bytes)
    return app


def _add_guards(app: FastAPI, max_upload_bytes: int, allowed_hosts: list[str] | None) -> None:
    """The middleware every request passes: the Host check, the size limit, the security headers."""
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # Refused by the declared length before parsing; the body is drained so every client reads
        # the 413. _read_limited covers bodies without a declared length.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
            if request.headers.get("expect", "").lower() != "100-continue":  # such a client waits: no body comes
                await _drain(request, DRAIN_BYTES)
            return JSONResponse(status_code=413, content={"detail": _too_large(max_upload_bytes)})
        return await call_next(request)

    # Added last, so outermost: the 400 of a foreign Host and the 413 carry the headers too.
    app.middleware("http")(_security_headers)


async def _security_headers(request: Request, call_next):
    """No sniffing, no framing, no referrer; a content security policy on the upload page and the API docs."""
    response = await call_next(request)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.url.path == "/":  # the upload page: its own inline script and style, images it makes
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
        )
    if request.url.path in ("/docs", "/redoc"):
        # Nothing but this service: ReDoc's sidebar would fetch its maker's logo from a CDN.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
    return response


def _add_routes(app: FastAPI, max_upload_bytes: int) -> None:
    """/health, /model, /predict, /explain and the upload page."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model(request: Request) -> dict:
        p = request.app.state.predictor
        return {
            "classes": p.classes_,
            "model": p.config_["model"],
            "preprocessing": p.config_["preprocessing"],
            "backend": p.backend_,
            "temperature": p.temperature_,
            "ood": p.config_.get("ood"),
            # first the figures against chance (balanced accuracy beside the majority class, AUROC
            # beside 0.5) of the test, its held-out or worst site and each external set; None: not run
            "headline": p.headline_,
            "metrics": p.metrics_,
            "model_card": p.card_,  # MODEL_CARD.md (Markdown), None for a bundle without one
        }

    @app.post("/predict")
    async def predict(request: Request, file: UploadFile) -> dict:
        p = request.app.state.predictor
        data = await _read_limited(file, max_upload_bytes)
        probs, score = await _in_worker(request, _decode_and_predict, p, data, file.filename or "")
        return {**p.describe(probs, score), "model": p.config_["model"]["name"]}

    @app.post("/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request, file: UploadFile) -> Response:
        p = request.app.state.predictor
        data = await _read_limited(file, max_upload_bytes)
        png = await _in_worker(request, _overlay_png, p, data, request.app.state.explain_lock, file.filename or "")
        return Response(content=png, media_type="image/png")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text().replace("__MAX_UPLOAD_BYTES__", str(max_upload_bytes))


async def _in_worker(request: Request, func, *args):
    """``func(*args)`` in a worker thread, at most one per core at a time; the event loop stays free."""
    return await anyio.to_thread.run_sync(func, *args, limiter=request.app.state.limiter)


def _decode_and_predict(predictor: Predictor, data: bytes, name: str) -> tuple[np.ndarray, float | None]:
    """(class probabilities, out-of-distribution score or None) of one upload."""
    image = _decode_upload(predictor, data, name)[None]
    scores = predictor.ood_scores(image)
    return predictor.predict_arrays(image)[0], None if scores is None else float(scores[0])


def _overlay_png(predictor: Predictor, data: bytes, lock: threading.Lock, name: str) -> bytes:
    """The upload as read beside where the model looked (``saliency.side_by_side``), as PNG."""
    from PIL import Image

    from lungxray.saliency import caption, saliency, side_by_side

    image = _decode_upload(predictor, data, name)
    with lock:
        heat = saliency(predictor, image[None])[0]
    scores = predictor.ood_scores(image[None])
    answer = predictor.describe(predictor.predict_arrays(image[None])[0], None if scores is None else float(scores[0]))
    picture = predictor.display(data, name)  # decoded above already: it reads
    buf = io.BytesIO()
    Image.fromarray(side_by_side(picture, heat, caption(predictor, answer))).save(buf, format="PNG")
    return buf.getvalue()


def default_allowed_hosts(host: str) -> list[str]:
    """The Host headers to answer when serving on ``host``: a loopback address and its names, the
    address itself otherwise, or any host when bound to every interface."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "localhost", "::1", "[::1]"]
    return [host]


def _bounded_protocol(timeouts: ServeTimeouts) -> type:
    """uvicorn's h11 protocol, with a deadline on each stage of a connection (``ServeTimeouts``):
    uvicorn times out only the wait between two requests. A connection past its deadline is closed;
    while the app answers a request, no deadline runs (uvicorn's keep-alive timer follows it).

    Subclasses uvicorn's H11Protocol and reads its ``conn`` (the h11 connection), ``loop`` and
    ``transport``: tests/test_serve.py checks the behaviour on a real server."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline, self._awaiting = None, "idle"
            self._expect("idle", timeouts.keep_alive)

        def data_received(self, data: bytes) -> None:
            if self._awaiting == "idle":  # the first byte of a request: its head has a deadline
                self._expect("head", timeouts.header)
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._awaiting == "head":
                self._expect("body", timeouts.body)
            elif state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in: the app's turn
                self._expect("idle", None)

        def connection_lost(self, exc) -> None:
            self._expect("idle", None)
            super().connection_lost(exc)

        def _expect(self, what: str, seconds: float | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._awaiting = what
            self._deadline = self.loop.call_later(seconds, self._expired) if seconds is not None else None

        def _expired(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol


def uvicorn_options(timeouts: ServeTimeouts) -> dict:
    """The options of ``uvicorn.run`` (or ``uvicorn.Config``) that hold every connection to ``timeouts``."""
    return {"http": _bounded_protocol(timeouts), "timeout_keep_alive": timeouts.keep_alive}


def serve(
    model_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    allowed_hosts: list[str] | None = None,
    timeouts: ServeTimeouts | None = None,
) -> None:
    """Run the app with uvicorn until interrupted; ``timeouts`` (None: the defaults) bound how long
    a connection may idle or take to send a request."""
    import errno
    import socket

    import uvicorn

    from lungxray.errors import ConfigError

    # bind once, as uvicorn will, so a port in use is one line here rather than uvicorn's log and exit 3
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn's too: TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use: pass --port N") from None
            raise ConfigError(f"cannot listen on port {port} of {host}: {exc.strerror or exc}",
                              hint="pass another --host or --port") from None  # fmt: skip
    app = create_app(model_dir, backend, allowed_hosts=allowed_hosts or default_allowed_hosts(host))
    uvicorn.run(app, host=host, port=port, log_level="info", **uvicorn_options(timeouts or ServeTimeouts()))
