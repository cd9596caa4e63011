"""`fastcomer serve`: the HTTP recognition service with in-flight batching (docs/serve.md)."""
import argparse

from .arguments import check_model_limits, device, load_checkpoint, port_number, positive_int, positive_seconds

# python-multipart (Starlette's form parser) was the module `multipart` before 0.0.13
SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client", "python_multipart|multipart", "PIL")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="an HTTP recognition service with in-flight batching",
        description="Serve CoMER over HTTP: POST an image (raw body with its Content-Type, or multipart/form-data) to "
        "/v1/recognize?beam_size=&max_len= for {latex, tokens, score}; /healthz, /readyz, /metrics (Prometheus). "
        "Each worker process holds the model and decodes its requests together, joining and leaving a running batch "
        "at step boundaries; each answer equals decoding the image alone. SIGTERM drains: in-flight requests are "
        "answered, then the server exits.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="CoMER checkpoint (Lightning .ckpt as published, or a state dict)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=8000, help="default: %(default)s (0: any free port)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="worker processes, each with the model (default: the cores this process may use on CPU, "
                             "1 on CUDA)")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:n] (default: %(default)s)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="images decoding at once per worker (default: %(default)s)")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="images waiting per worker; past it requests get 503 (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_seconds, default=60.0,
                        help="a request's time from arrival to answer; past it 504 (default: %(default)s)")
    parser.add_argument("--beam-size", type=positive_int, default=None,
                        help="a request's default (default: 10, or --max-beam-size when smaller)")
    parser.add_argument("--max-beam-size", type=positive_int, default=10,
                        help="the largest beam_size a request may ask for (default: %(default)s)")
    parser.add_argument("--max-len", type=positive_int, default=200,
                        help="the largest max_len a request may ask for, and its default (default: %(default)s)")
    parser.add_argument("--max-bytes", type=positive_int, default=10 * 2**20,
                        help="of a request's body; past it 413 (default: %(default)s)")
    parser.add_argument("--max-pixels", type=positive_int, default=4096 * 4096,
                        help="of one image before scaling; past it 413 (default: %(default)s)")
    parser.add_argument("--max-images", type=positive_int, default=16,
                        help="images per multipart request; past it 413 (default: %(default)s)")
    parser.add_argument("--no-batching", action="store_true",
                        help="decode each request alone with fastcomer.recognize (the load test's baseline)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    parser.set_defaults(run=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT: 0; 1 when the service cannot start; 2 for a usage error."""
    from ..extras import require

    require("serve", *SERVE_MODULES, purpose="fastcomer serve")
    from ..serving.server import serve
    from ..serving.settings import ServeSettings
    from ..search.images import available_cores

    model = load_checkpoint(args.parser, args.checkpoint, args.device)
    check_model_limits(args.parser, model, args.max_len, args.max_beam_size, "--max-beam-size")
    if args.beam_size is None:
        args.beam_size = min(10, args.max_beam_size)
    if args.beam_size > args.max_beam_size:
        args.parser.error(f"--beam-size {args.beam_size} is more than --max-beam-size {args.max_beam_size}")
    del model  # each worker loads its own
    workers = args.workers or (available_cores() if args.device == "cpu" else 1)
    settings = ServeSettings(
        checkpoint=str(args.checkpoint), device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
        timeout_s=args.timeout_s, max_beam_size=args.max_beam_size, max_len=args.max_len, beam_size=args.beam_size,
        max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_images=args.max_images, batching=not args.no_batching)
    return serve(settings, args.host, args.port, workers, args.log_level)
