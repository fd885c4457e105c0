"""The web service: a FastAPI app built around one ``Predictor``, loaded once at start-up.

``POST /predict`` and ``POST /explain`` take a multipart upload (field ``file``); ``GET /health``,
``GET /model``, ``GET /model/card`` and the upload page at ``/``. Every answer about an image
carries the model that gave it (``serve_schema.model_context``: name, version, training date, data,
measured figures, card); the answers' typed models are ``serve_schema``'s. Inference runs in a
worker thread so the event loop never waits on the model; at most one model call per core runs at
a time. Every bad upload gets a 4xx whose message names the file and says what was wrong: too
large (413), empty, not an image, truncated, a decompression bomb, an unsupported mode, a DICOM
file that is not a frontal radiograph (422). DICOM uploads are read as in training
(``decode.py``); no patient data comes back. Holds no training code.
"""

from __future__ import annotations

import html
import io
import logging
import os
import re
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import anyio
import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lungxray.config import ServeTimeouts
from lungxray.errors import UnusableImage
from lungxray.predictor import Predictor
from lungxray.serve_schema import Health, ModelInfo, Prediction, Problem, model_context, multilabel_info
from lungxray.version import __version__

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# An over-limit body is read and dropped up to this many bytes before the 413 goes out: a client
# that sends its whole body before reading (no Expect: 100-continue, as urllib and browsers do)
# otherwise meets a closed connection instead of the answer. Beyond it, the connection is cut.
DRAIN_BYTES = 256 * 1024 * 1024
PAGE = Path(__file__).with_name("upload.html")


def _decode_upload(predictor: Predictor, data: bytes, name: str = "") -> np.ndarray:
    """Upload bytes (a file called ``name``) -> (H, W) uint8 preprocessed image, or a 422 that names
    the file, says why not and what to do."""
    try:
        return predictor.decode(data, name=name)
    except Exception as exc:  # noqa: BLE001 - a hostile file may break a decoder in any way; never a 500
        if not isinstance(exc, UnusableImage):  # the type only: the file's name or bytes may identify a patient
            logging.getLogger(__name__).warning("an upload broke the image decoder: %s", type(exc).__name__)
        raise HTTPException(status_code=422, detail=unreadable(exc, name)) from None


# A decoder's own words name the library that failed: a person uploading a film cannot act on them.
LIBRARY = re.compile(r"\b(Pillow|PIL)\b")


def unreadable(exc: Exception, name: str) -> str:
    """What a user reads when the upload called ``name`` cannot be used: the file, why, what to do.
    ``UnusableImage``'s reason is kept unless it names a library; any other failure is a file that
    is not an image lungxray reads."""
    shown = f"'{_shown_name(name)}'" if _shown_name(name) else "The upload"
    reason = str(exc) if isinstance(exc, UnusableImage) else ""
    if not reason or LIBRARY.search(reason):
        return f"{shown} is not an image lungxray can read (PNG, JPEG, DICOM, ...): upload a chest X-ray image file"
    said = "; ".join(part.rstrip(". ") for part in (reason, exc.hint) if part)
    return f"{shown} cannot be used: {said}. Upload a frontal chest X-ray (PNG, JPEG or DICOM)."


def _shown_name(name: str) -> str:
    """The upload's file name as it may be shown: its last path part, printable, at most 120 characters."""
    base = re.split(r"[\\/]", name)[-1]
    return "".join(c for c in base if c.isprintable())[:120]


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
        title="lungxray",
        summary="Chest X-ray classifier: predictions and where the model looked",
        description="Research use only: not a diagnosis. Every answer names the model that gave it and how it "
        "scored on films it never trained on (GET /model, GET /model/card).",
        version=__version__,
        lifespan=lifespan,
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
    if request.url.path == "/model/card":  # text and its own style only
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
        )
    if request.url.path in ("/docs", "/redoc"):
        # Nothing but this service: ReDoc's sidebar would fetch its maker's logo from a CDN.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
    return response


UPLOAD_ERRORS: dict = {
    413: {"model": Problem, "description": "The upload is larger than the service's limit."},
    422: {
        "model": Problem,
        "description": "The upload cannot be used: the message names the file, says why and what to do.",
    },
}
Upload = Annotated[UploadFile, File(description="One chest X-ray file: PNG, JPEG or DICOM.")]
PanelQuery = Annotated[
    Literal["figure", "read", "overlay"],
    Query(
        description="'figure': both halves, the colour scale and a caption in one image; 'read': the film "
        "alone; 'overlay': the film with the map alone (the upload page captions these itself)."
    ),
]

FindingQuery = Annotated[
    str | None,
    Query(
        description="The finding (or class) whose map to draw, by name as GET /model lists them; by default "
        "the predicted class, or a multi-label model's most probable finding."
    ),
]


def _add_routes(app: FastAPI, max_upload_bytes: int) -> None:
    """/health, /model, /model/card, /predict, /explain and the upload page; each route's docstring
    is its description in the OpenAPI schema (/docs, /redoc)."""

    @app.get("/health", response_model=Health, summary="Whether the service answers")
    async def health() -> dict:
        """'ok' once the model is loaded and requests are answered."""
        return {"status": "ok"}

    @app.get("/model", response_model=ModelInfo, summary="The model that answers")
    async def model(request: Request) -> dict:
        """Which model answers (name, lungxray version, training date, data), how it reads an image,
        its figures against chance on the test split, its sites and external sets, and its card."""
        from lungxray.saliency import method

        p = request.app.state.predictor
        return {
            "classes": p.classes_,
            "model": p.config_["model"],
            "preprocessing": p.config_["preprocessing"],
            "backend": p.backend_,
            "temperature": p.temperature_,
            **multilabel_info(p),
            "ood": p.config_.get("ood"),
            # first the figures against chance (balanced accuracy beside the majority class, AUROC
            # beside 0.5) of the test, its held-out or worst site and each external set; None: not run
            "headline": p.headline_,
            "metrics": p.metrics_,
            "model_card": p.card_,  # MODEL_CARD.md (Markdown), None for a bundle without one
            "explanation": method(p),
            "model_context": _context(request),
        }

    no_card = {404: {"model": Problem, "description": "The bundle holds no model card."}}

    @app.get("/model/card", response_class=HTMLResponse, summary="The model card, as a page", responses=no_card)
    async def model_card(request: Request) -> str:
        """The bundle's MODEL_CARD.md (how the model was trained and measured, its intended use and
        its limits) under the model's name, version and training date."""
        p = request.app.state.predictor
        if p.card_ is None:
            detail = "this model's bundle holds no model card (MODEL_CARD.md); `lungxray run` writes one"
            raise HTTPException(status_code=404, detail=detail)
        return _card_page(p.card_, _context(request))

    @app.post("/predict", response_model=Prediction, responses=UPLOAD_ERRORS, summary="Classify one chest X-ray")
    async def predict(request: Request, file: Upload) -> dict:
        """The class probabilities of one uploaded film (a multi-label model's: each finding's, and
        those present) and its out-of-distribution score (an image unlike the training films is
        flagged, and its class is no answer), with the model that answered."""
        p = request.app.state.predictor
        data = await _read_limited(file, max_upload_bytes)
        probs, score = await _in_worker(request, _decode_and_predict, p, data, file.filename or "")
        return {**p.describe(probs, score), "model": p.config_["model"]["name"], "model_context": _context(request)}

    png = {200: {"content": {"image/png": {}}, "description": "The picture that `panel` names, as PNG."}}

    @app.post("/explain", response_class=Response, responses=png | UPLOAD_ERRORS, summary="Where the model looked")
    async def explain(
        request: Request, file: Upload, panel: PanelQuery = "figure", finding: FindingQuery = None
    ) -> Response:
        """The uploaded film as read and, in warm colours, the regions the model relied on for its
        answer (Grad-CAM, or the input gradient for the MLP): for its class, its most probable
        finding, or the finding (or class) that ``finding`` names."""
        p = request.app.state.predictor
        if finding is not None and finding not in p.classes_:
            detail = f"{finding[:100]!r} is not a finding of this model; it answers {', '.join(p.classes_)}"
            raise HTTPException(status_code=422, detail=detail)
        data = await _read_limited(file, max_upload_bytes)
        lock, name = request.app.state.explain_lock, file.filename or ""
        target = None if finding is None else p.classes_.index(finding)
        png = await _in_worker(request, _picture_png, p, data, lock, name, panel, target)
        return Response(content=png, media_type="image/png")

    @app.get("/", response_class=HTMLResponse, summary="The upload page")
    async def page() -> str:
        """Choose or drop a film: its answer, the model that gave it and where it looked appear."""
        return PAGE.read_text().replace("__MAX_UPLOAD_BYTES__", str(max_upload_bytes))


def _context(request: Request) -> dict:
    """``serve_schema.model_context`` of the app's model, its card linked where this service serves it."""
    # relative to the service's root, not an absolute URL built from the Host header: right behind a
    # proxy that terminates TLS or serves under a path prefix (root_path)
    card = request.scope.get("root_path", "") + request.app.url_path_for("model_card")
    return model_context(request.app.state.predictor, card)


CARD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Model card: {name}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 1.5em auto; padding: 0 1em; color: #222 }}
pre {{ font: inherit; line-height: 1.45; white-space: pre-wrap; overflow-wrap: anywhere }}</style></head>
<body><h1>Model card: {name}</h1>
<p>Made by lungxray {version}, trained {trained}. Research use only: not a diagnosis.</p>
<pre>{card}</pre></body></html>
"""


def _card_page(card: str, context: dict) -> str:
    """The model card's Markdown, shown as written, in a page headed by the model's name."""
    fields = {**context, "trained": context["trained"] or "on a day not recorded", "card": card}
    return CARD_PAGE.format(**{k: html.escape(str(fields[k])) for k in ("name", "version", "trained", "card")})


async def _in_worker(request: Request, func, *args):
    """``func(*args)`` in a worker thread, at most one per core at a time; the event loop stays free."""
    return await anyio.to_thread.run_sync(func, *args, limiter=request.app.state.limiter)


def _decode_and_predict(predictor: Predictor, data: bytes, name: str) -> tuple[np.ndarray, float | None]:
    """(class probabilities, out-of-distribution score or None) of one upload."""
    image = _decode_upload(predictor, data, name)[None]
    scores = predictor.ood_scores(image)
    return predictor.predict_arrays(image)[0], None if scores is None else float(scores[0])


def _picture_png(
    predictor: Predictor, data: bytes, lock: threading.Lock, name: str, panel: str, target: int | None
) -> bytes:
    """The upload as read and where the model looked, as PNG: ``saliency.side_by_side``'s figure, or
    one of its halves alone (``panel`` "read" or "overlay", ``saliency.panels``); the map for the
    class (or finding) at index ``target``, None: the predicted class or most probable finding."""
    from lungxray.saliency import caption, panels, saliency, side_by_side

    image = _decode_upload(predictor, data, name)
    picture = predictor.display(data, name)  # decoded above already: it reads
    if panel == "read":
        return _png(panels(picture)[0])
    with lock:
        heat = saliency(predictor, image[None], None if target is None else [target])[0]
    if panel == "overlay":
        return _png(panels(picture, heat)[1])
    scores = predictor.ood_scores(image[None])
    answer = predictor.describe(predictor.predict_arrays(image[None])[0], None if scores is None else float(scores[0]))
    shown = None if target is None else predictor.classes_[target]
    return _png(side_by_side(picture, heat, caption(predictor, answer, shown)))


def _png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
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
