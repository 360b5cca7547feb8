"""Search a trained MMHH model's database from a web page and a JSON API (README, "Search page and API").

    python serve.py --index fashion.index --model_path SNAPSHOT              # then open http://127.0.0.1:8000/
    python serve.py --codes_dir test_output/demo --dataset fashion_mnist --model_path SNAPSHOT --port 8080
    python serve.py --index fashion.index --model_path SNAPSHOT --allow_writes    # POST and DELETE /api/items
"""
import argparse
import dataclasses
import io
import logging
import os
import random
import sys
import time

import torch
import uvicorn
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException

import retrieval
from hamming_index import IndexFileError
from live_index import LiveIndex
from runtime import UsageError, run_cli, select_device, setup_logging

log = logging.getLogger("mmhh")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# A ball of radius r reads sum_{i<=r} C(b, i) table prefixes; at 4 the 48-bit demo's balls hold most of
# the database, which a page of thumbnails cannot show anyway.
MAX_RADIUS = 3
MAX_TOPK = 100
# Room for the multipart framing around an image of --max_upload_mb.
MULTIPART_SLACK = 64 * 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Search an MMHH model's database from a web page and a JSON "
                                                 "API: upload a query image, see its Hamming ball.")
    retrieval.add_database_flags(parser)
    service = parser.add_argument_group("the service")
    service.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only)")
    service.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    service.add_argument("--fallback_topk", type=int, default=10,
                         help="for an empty ball, answer with this many nearest codes instead, by Hamming "
                              "distance then score (default 10; 0: none)")
    service.add_argument("--allow_writes", action="store_true",
                         help="take POST /api/items (add an image) and DELETE /api/items/N, saved to --index")
    service.add_argument("--max_upload_mb", type=float, default=10.0,
                         help="largest image file taken, in MiB (default 10)")
    service.add_argument("--max_pixels", type=int, default=40_000_000,
                         help="largest image taken, in pixels, checked before decoding (default 40,000,000)")
    service.add_argument("--threads", type=int, default=1,
                         help="torch threads a request encodes with (default 1: concurrent requests share the "
                              "cores, where threads of one request would wait on each other)")
    retrieval.add_encoding_flags(parser)
    return parser.parse_args(argv)


def main(argv=None):
    setup_logging(None, None, to_file=False)
    service = build_service(argv)
    args = service.args
    torch.set_num_threads(args.threads)
    log.info("serving %d items on http://%s:%d/ (Ctrl-C stops; one line a request follows)",
             len(service.database.view.numbers), args.host, args.port)
    uvicorn.run(create_app(service), host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


def check_flags(args):
    """Every flag problem before any work: one line each."""
    retrieval.check_database_flags(args)
    if not args.model_path:
        raise UsageError("serve.py encodes the uploaded images: give --model_path SNAPSHOT, the network that made "
                         "the index's codes")
    if args.allow_writes and not args.index:
        raise UsageError("--allow_writes saves added items to the index file: give --index FILE (build one with "
                         "python retrieve.py --save_index FILE ...)")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be 1 to 65535")
    for flag, low in (("fallback_topk", 0), ("max_pixels", 1), ("threads", 1), ("batch_size", 1), ("workers", 0)):
        if getattr(args, flag) < low:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least {low}")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max_upload_mb {args.max_upload_mb}: must be above 0")


@dataclasses.dataclass
class Service:
    """What the routes need: the flags, the network that encodes uploads, and the database."""
    args: argparse.Namespace
    model: torch.nn.Module
    device: torch.device
    transform: object
    database: LiveIndex


def build_service(argv=None):
    """The Service the flags describe: the snapshot loaded, the database indexed."""
    args = parse_args(argv)
    check_flags(args)
    device = select_device(args.gpu_id)
    snapshot, model = retrieval.load_model(args, device)
    index = retrieval.database_index(args, snapshot, model, device)
    if args.allow_writes and index.paths is None:
        raise UsageError(f"--allow_writes adds images beside the index's own, but {args.index} has no image paths; "
                         "rebuild it with the list the codes were made from (--dataset NAME or --database_list FILE)")
    database = LiveIndex(index, args.index if args.allow_writes else None)
    return Service(args, model, device, retrieval.image_transform(args), database)


# ----------------------------------------------------------------------------------------------
# The routes
# ----------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request that cannot be answered: its HTTP status and a message naming the problem."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def create_app(service):
    """The FastAPI application: the page, the API, and JSON errors for everything that goes wrong."""
    app = FastAPI(title="MMHH search", description="Hamming-ball retrieval with a trained MMHH model "
                                                   "(README, 'Search page and API').")
    app.state.service = service
    add_error_handlers(app)
    megabytes = service.args.max_upload_mb
    app.add_middleware(BodyLimit, limit=int(megabytes * 2**20) + MULTIPART_SLACK,
                       message=f"the upload is over --max_upload_mb {megabytes:g} MiB")
    app.add_middleware(AccessLog)
    app.include_router(routes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


routes = APIRouter()


@routes.get("/", include_in_schema=False)
def page():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))


@routes.post("/api/search")
def search(request: Request, image: UploadFile | None = File(None), item: int | None = None, radius: int = 2,
           topk: int = 10):
    """Search with an uploaded image (multipart field ``image``) or with database item ``item``: the
    document retrieve.py --json writes for one query, plus the query's code and the timings."""
    service = request.app.state.service
    check_range("radius", radius, 0, MAX_RADIUS)
    check_range("topk", topk, 1, MAX_TOPK)
    if (image is None) == (item is None):
        raise ApiError(400, "give one query: a multipart field 'image' with an image file, or the query "
                            "parameter item=N to search with database item N")
    view = service.database.view
    started = time.perf_counter()
    if item is None:
        code = encode_upload(service, decode_image(image.file.read(), service.args))
        query, labels = image.filename or "upload", None
    else:
        position = item_position(view, item)
        code = view.index.codes[position:position + 1]
        query = view.index.paths[position] if view.index.paths else f"#{item}"
        labels = view.index.labels[position:position + 1] if view.index.labels is not None else None
    encoded = time.perf_counter()
    answer = view.index.search(code, radius, topk, service.args.fallback_topk, labels)[0]
    document = retrieval.answer_document(query, answer, view.index, view.numbers)
    document.update(query_item=item, radius=radius, topk=topk, code=sign_bits(code[0]),
                    timings_ms={"encode": round(1000 * (encoded - started), 3),
                                "lookup": round(1000 * (time.perf_counter() - encoded), 3)})
    return JSONResponse(document)


@routes.get("/api/items/random")
def random_item(request: Request):
    """A database item drawn at random: {index}."""
    numbers = request.app.state.service.database.view.numbers
    return {"index": int(numbers[random.randrange(len(numbers))])}


@routes.get("/api/items/{number}/image")
def item_image(request: Request, number: int):
    """The image of database item ``number``; no other file is ever served."""
    view = request.app.state.service.database.view
    position = item_position(view, number)
    if view.index.paths is None:
        raise ApiError(404, "the index has no image paths (it was made from saved codes without their list)")
    try:
        with open(view.index.paths[position], "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ApiError(404, f"item {number}'s image cannot be read on the server ({error.strerror})") from None
    return Response(data, media_type=image_media_type(data),
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


@routes.get("/api/stats")
def stats(request: Request):
    """The database and the service: items, bits, distinct codes, snapshot, index file, limits."""
    args = request.app.state.service.args
    view = request.app.state.service.database.view
    index = view.index
    return {"items": len(view.numbers), "bits": index.bits, "distinct_codes": view.distinct_codes,
            "labels": None if index.labels is None else index.labels.shape[1], "images": index.paths is not None,
            "snapshot": os.path.abspath(args.model_path),
            "index_file": os.path.abspath(args.index) if args.index else None,
            "source": {key: value for key, value in index.source.items() if key != retrieval.ITEM_NUMBERS},
            "allow_writes": args.allow_writes, "max_radius": MAX_RADIUS, "max_topk": MAX_TOPK,
            "fallback_topk": args.fallback_topk, "max_upload_mb": args.max_upload_mb, "max_pixels": args.max_pixels}


@routes.post("/api/items", status_code=201)
def add_item(request: Request, image: UploadFile = File(...), labels: str | None = Form(None)):
    """Add an image (and its 0/1 ``labels``, space- or comma-separated) to the index: {index, items}."""
    service = request.app.state.service
    require_writes(service.args)
    data = image.file.read()
    decoded = decode_image(data, service.args)
    label_row = parse_labels(labels, service.database.view.index)
    code = encode_upload(service, decoded)
    try:
        number = service.database.add(code, data, f".{decoded.format.lower()}", label_row)
    except (IndexFileError, OSError) as error:
        raise ApiError(507, f"the image was not added: {error}") from None
    return {"index": number, "items": len(service.database.view.numbers)}


@routes.delete("/api/items/{number}")
def remove_item(request: Request, number: int):
    """Remove database item ``number``; the other items keep their numbers: {removed, items}."""
    database = request.app.state.service.database
    require_writes(request.app.state.service.args)
    try:
        removed = database.remove(number)
    except ValueError as error:
        raise ApiError(409, str(error)) from None
    except (IndexFileError, OSError) as error:
        raise ApiError(507, f"item {number} was not removed: {error}") from None
    if not removed:
        raise ApiError(404, unknown_item_message(database.view, number))
    return {"removed": number, "items": len(database.view.numbers)}


def check_range(name, value, low, high):
    if not low <= value <= high:
        raise ApiError(422, f"{name} {value} is out of range: give {low} to {high}")


def item_position(view, number):
    """Where database item ``number`` is; a 404 naming it when there is none."""
    position = view.position(number)
    if position is None:
        raise ApiError(404, unknown_item_message(view, number))
    return position


def unknown_item_message(view, number):
    return (f"no database item {number}: the items are numbered {int(view.numbers[0])} to "
            f"{int(view.numbers[-1])} ({len(view.numbers)} items; removed numbers are not reused)")


def require_writes(args):
    if not args.allow_writes:
        raise ApiError(403, "this service does not change its index: start it with --allow_writes to add and "
                            "remove items")


def decode_image(data, args):
    """The uploaded bytes as a decoded PIL image; a 4xx naming the problem when they are not one we take."""
    if not data:
        raise ApiError(400, "the uploaded image is empty (0 bytes): choose an image file")
    if len(data) > args.max_upload_mb * 2**20:
        raise ApiError(413, f"the image is {len(data):,} bytes, over --max_upload_mb {args.max_upload_mb:g} "
                            f"({int(args.max_upload_mb * 2**20):,} bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not an image that PIL can read: send a PNG, JPEG, GIF, WebP or BMP "
                            "file") from None
    except Image.DecompressionBombError as error:
        raise ApiError(413, f"the image has too many pixels ({error})") from None
    width, height = image.size
    if width * height > args.max_pixels:
        raise ApiError(413, f"the image is {width}x{height} = {width * height:,} pixels, over --max_pixels "
                            f"{args.max_pixels:,}")
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data: every decoder fails in its own way
        raise ApiError(400, f"the {image.format} image cannot be decoded ({type(error).__name__}: {error})") from None
    return image


def sign_bits(code):
    """A (K,) code's sign bits as text: '1' where h >= 0 (sign(0) = +1, as the index), else '0'."""
    return "".join("1" if positive else "0" for positive in (code >= 0).tolist())


def encode_upload(service, image):
    """(1, K) code of a decoded upload, as retrieve.py encodes a query image."""
    return retrieval.encode_image(service.model, image, service.transform, service.device, service.args.amp)


def parse_labels(text, index):
    """(C,) uint8 labels of 'l1 ... lC' (0/1, space- or comma-separated), or None when none are given."""
    if text is None or not text.strip():
        return None
    if index.labels is None:
        raise ApiError(422, "the index has no labels: add the image without 'labels'")
    tokens = text.replace(",", " ").split()
    width = index.labels.shape[1]
    if len(tokens) != width or any(token not in ("0", "1") for token in tokens):
        raise ApiError(422, f"labels {text!r}: give {width} values, each 0 or 1, as the index's items have")
    return torch.tensor([int(token) for token in tokens], dtype=torch.uint8)


def image_media_type(data):
    """The media type of an image file's bytes, from its content (never from a name)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format, "application/octet-stream")
    except Exception:  # not decodable: the browser gets it as plain bytes
        return "application/octet-stream"


# ----------------------------------------------------------------------------------------------
# Errors, the body limit and the request log
# ----------------------------------------------------------------------------------------------

def add_error_handlers(app):
    """Every failure answers JSON {"error": words}, so the page can show it and a client can read it."""

    @app.exception_handler(ApiError)
    async def api_error(request, error):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        problems = [f"{' '.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        message = error.detail
        if error.status_code == 404:
            message = f"no such page or API route: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def bug(request, error):
        log.exception("error while answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(error).__name__}: {error}); the server logged it"},
                            status_code=500)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with a 413 naming the limit: by its Content-Length before
    reading it, else when the bytes received pass the limit (chunked uploads)."""

    def __init__(self, app, limit, message):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"error": self.message}, status_code=413)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.message)    # the form parser passes it on to the JSON handler
            return message

        await self.app(scope, counted_receive, send)


class AccessLog:
    """One line a request: client, method, path and query, status, milliseconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            client = scope["client"][0] if scope.get("client") else "-"
            log.info("%s %s %s%s %d %.1f ms", client, scope["method"], scope["path"], f"?{query}" if query else "",
                     status, 1000 * (time.perf_counter() - started))


if __name__ == "__main__":
    sys.exit(run_cli(main))
