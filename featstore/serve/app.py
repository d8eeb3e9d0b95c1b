"""The `featstore serve` web app (Starlette): routes, the token check, clean errors.

Starlette rather than FastAPI: a dozen GET routes need no request models or OpenAPI
schema, and Starlette is FastAPI's own core (one well-kept dependency less, and
`TestClient` the same). uvicorn runs it. Every route only reads: sets through
`FeatureSet.open` (zarr in mode "r"), results.csv and OUT/predictions/*.parquet.

Every failure is a clean 4xx (or a 500 with one line): JSON for /api/ and /img/,
an HTML page otherwise; never a traceback.
"""

from __future__ import annotations

import hmac
import io
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from featstore.serve import pages
from featstore.serve.data import SERVED, Explorer, OpenSet, ServeError
from featstore.serve.failures import disagreements, failures
from featstore.serve.neighbours import Index

STATIC = Path(__file__).with_name("static")
STATIC_FILES = {"explorer.js": "text/javascript", "style.css": "text/css"}
TOKEN_COOKIE = "featstore_token"
TILE = 128  # px of a grid tile and of a feature map
FIT_ITEMS = 64  # test items a dataset-level PCA is fitted on (evenly spaced)


class Server:
    """The state one app holds: the explorer and one neighbour index per set."""

    def __init__(self, explorer: Explorer) -> None:
        self.ex = explorer
        self.indexes: dict[str, Index] = {}

    def index(self, s: OpenSet) -> Index:
        """The set's index, built at its first query (the CLS matrix read once)."""
        if s.info.key not in self.indexes:
            vectors, ok = s.cls_matrix()
            self.indexes[s.info.key] = Index(vectors, ok)
        return self.indexes[s.info.key]


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith(("/api/", "/img/"))


def _error(request: Request, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    return HTMLResponse(pages.error_page(status, message), status_code=status)


async def _on_serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return _error(request, exc.status, str(exc))


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "no such page" if exc.status_code == 404 else str(exc.detail)
    return _error(request, exc.status_code, f"{message}: {request.url.path}")


async def _on_other(request: Request, exc: Exception) -> Response:
    # A bug or an unexpected file: one line, never a traceback page.
    return _error(request, 500, f"{type(exc).__name__}: {exc}")


class TokenCheck(BaseHTTPMiddleware):
    """Every request carries `token` (query `?token=`, once; then the cookie it sets,
    or an `Authorization: Bearer` header). Used when bound beyond loopback."""

    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        given = [request.query_params.get("token"), request.cookies.get(TOKEN_COOKIE), bearer]
        if not any(g and hmac.compare_digest(g, self.token) for g in given):
            return _error(request, 403, "this server needs its token: open the URL it printed")
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


def _png(pixels: np.ndarray, side: int = TILE) -> Response:
    """(h, w) or (h, w, 3) uint8 as a PNG, scaled (nearest) so its long side is `side`."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels))
    scale = max(1, side // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers={"cache-control": "no-store"})


def _int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.path_params.get(name, request.query_params.get(name))
    if raw is None and default is not None:
        return default
    try:
        return int(str(raw))
    except (TypeError, ValueError):
        raise ServeError(400, f"'{name}' must be a whole number, not {raw!r}") from None


def build_app(out: Path, cache: Path, token: str | None = None) -> Starlette:
    """The app serving `cache`'s sets and `out`'s results; `token`: required on every
    request (None: none, for loopback)."""
    srv = Server(Explorer(out, cache))
    ex = srv.ex

    def items_of(s: OpenSet) -> dict[str, int]:
        first: dict[str, int] = {}
        for i, sample in enumerate(s.samples.tolist()):
            first.setdefault(sample, i)
        return first

    async def overview(request: Request) -> Response:
        return HTMLResponse(pages.overview(ex.sets(), ex.results(), str(cache), str(out)))

    async def browser(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        return HTMLResponse(pages.browser(s, ex.partners(s.info.key)))

    async def item_page(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        return HTMLResponse(pages.item(s, s.check(_int(request, "item")), ex.partners(s.info.key)))

    async def failures_page(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        sections = [(p.key.probe, p.task, failures(p)) for p in ex.predictions(s.info.key)]
        limit = _int(request, "limit", 50)
        return HTMLResponse(pages.failures_page(s, sections, items_of(s), limit))

    async def api_sets(request: Request) -> Response:
        return JSONResponse(
            [
                {**{k: v for k, v in vars(s).items() if k != "folder"}, "label": s.label}
                for s in ex.sets()
            ]
        )

    async def api_items(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        predicted = ex.predicted(s.info.key)
        labels = s.labels
        return JSONResponse(
            {
                "key": s.info.key,
                "items": [
                    {
                        "item": i,
                        "sample": sample,
                        "split": s.splits[i],
                        "label": None if labels is None else labels[i].item(),
                        "predicted": predicted.get(sample),
                    }
                    for i, sample in enumerate(s.samples.tolist())
                ],
            }
        )

    async def api_neighbours(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        at, k = s.check(_int(request, "item")), _int(request, "k", 8)
        index = srv.index(s)
        if not index.usable[at]:
            raise ServeError(422, f"item {at} of {s.info.folder} has no readable CLS token")
        labels = s.labels
        return JSONResponse(
            {
                "key": s.info.key,
                "label": s.info.label,
                "item": at,
                "neighbours": [
                    {
                        "item": n.item,
                        "sample": s.samples[n.item],
                        "split": s.splits[n.item],
                        "label": None if labels is None else labels[n.item].item(),
                        "similarity": round(n.similarity, 6),
                    }
                    for n in index.query(at, max(1, min(k, 100)))
                ],
            }
        )

    async def api_failures(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        kept = ex.predictions(s.info.key)
        body: dict[str, Any] = {
            p.key.probe: [vars(f) for f in failures(p)] for p in kept
        }  # probe -> failures, worst first
        other = request.query_params.get("versus")
        if other:
            theirs = {p.key.probe: p for p in ex.predictions(ex.info(other).key)}
            body = {"failures": body, "versus": {}}
            for p in kept:
                if p.key.probe in theirs:
                    mine, their = disagreements(p, theirs[p.key.probe])
                    body["versus"][p.key.probe] = {"only_this_right": mine, "only_other": their}
        return JSONResponse(body)

    async def tile(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        at = s.check(_int(request, "item"))
        thumb = s.thumbnail(at)
        if thumb is not None:
            return _png(thumb)
        if "patch" not in s.xs:
            raise ServeError(404, f"item {at}: no thumbnail recorded and no patch tokens")
        return _png(_pca(s, at, "image"))

    async def pca(request: Request) -> Response:
        s = ex.open(request.path_params["key"])
        fit = request.query_params.get("fit", "image")
        if fit not in ("image", "test"):
            raise ServeError(400, f"fit must be 'image' or 'test', not {fit!r}")
        return _png(_pca(s, s.check(_int(request, "item")), fit))

    async def result_file(request: Request) -> Response:
        path = ex.result_file(request.path_params["path"])
        return FileResponse(path, media_type=SERVED[path.suffix.lower()])

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            raise ServeError(404, f"no static file '{name}'")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    routes = [
        Route("/", overview),
        Route("/set/{key}", browser),
        Route("/set/{key}/item/{item}", item_page),
        Route("/set/{key}/failures", failures_page),
        Route("/api/sets", api_sets),
        Route("/api/sets/{key}/items", api_items),
        Route("/api/sets/{key}/neighbours/{item}", api_neighbours),
        Route("/api/sets/{key}/failures", api_failures),
        Route("/img/{key}/{item}/tile.png", tile),
        Route("/img/{key}/{item}/pca.png", pca),
        Route("/results/{path:path}", result_file),
        Route("/static/{name}", static),
    ]
    handlers: dict[Any, Any] = {
        ServeError: _on_serve_error,
        HTTPException: _on_http,
        Exception: _on_other,
    }
    middleware = [Middleware(TokenCheck, token=token)] if token else []
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)


def _pca(s: OpenSet, at: int, fit: str) -> np.ndarray:
    """(rows, cols, 3) uint8: the PCA-RGB of item `at`'s patch tokens, fitted on the
    item itself or on up to `FIT_ITEMS` of the set's test items."""
    from featstore.report.tables import pca_rgb

    patch = s.read("patch", at).astype(np.float32)
    if patch.ndim == 4:  # several patch layers: the last
        patch = patch[-1]
    if not np.isfinite(patch).all():
        raise ServeError(422, f"item {at} has no patch tokens (a skipped sample)")
    ref = None
    if fit == "test":
        test = np.flatnonzero(s.splits == "test")
        if not len(test):
            raise ServeError(404, f"set {s.info.key} has no test items to fit a PCA on")
        pick = test[np.linspace(0, len(test) - 1, min(FIT_ITEMS, len(test))).astype(int)]
        ref = np.stack([s.read("patch", int(i)).astype(np.float32) for i in np.unique(pick)])
        ref = ref[:, -1] if ref.ndim == 5 else ref
        ref = ref[np.isfinite(ref).all((1, 2, 3))]
    rgb = pca_rgb(patch[None], ref)[0]
    return (rgb * 255).round().astype(np.uint8)


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: reachable from elsewhere as far as we know
        return False


def token_for(host: str) -> str | None:
    """A fresh random token where `host` is not loopback; None where it is."""
    import secrets

    return None if is_loopback(host) else secrets.token_urlsafe(24)
