"""``vlmguard run-batch``: the command line of ``run_batch.py`` (parsing it imports no model code)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from vlmguard.commands.generate import add_model_args, positive_int
from vlmguard.errors import InvalidInput


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run-batch", help="run a file of API requests (OpenAI's batch format) offline, batched, without a service",
        description="Each line of --input is a request in OpenAI's Batch API format ({\"custom_id\", \"method\": "
                    "\"POST\", \"url\": \"/v1/chat/completions\", \"/v1/completions\", \"/v1/responses\" or "
                    "\"/v1/generate\", "
                    "\"body\"}); each body is answered as the HTTP service answers it (every pruner, decoder and "
                    "parameter), the requests sharing in-flight batches. --output gets one line per request in "
                    "OpenAI's batch output format "
                    "({\"id\", \"custom_id\", \"response\": {\"status_code\", \"request_id\", \"body\"}, \"error\"}), "
                    "written as each answer comes, in the order they finish.")
    p.add_argument("-i", "--input", type=Path, required=True, help="the requests, one JSON object a line")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the answers, one JSON object a line (must not exist, unless --resume)")
    add_model_args(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model id request bodies name (default: --model); a body without one gets this model")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="requests decoding at once (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long joiners wait to share one prefill (default 20)")
    p.add_argument("--concurrency", type=positive_int, default=None,
                   help="requests in flight at once (default: twice --max-batch-size; with --url 16)")
    p.add_argument("--max-new-tokens-limit", type=positive_int, default=1024,
                   help="the most tokens a request may ask for (default 1024)")
    p.add_argument("--prefix-cache-mb", type=float, default=1024.0, metavar="MIB",
                   help="MiB that keep image prefixes for later requests about the same image (default 1024; 0: off)")
    p.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                   help="image_url parts may be file:// URLs of images below this folder (default: refused)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    remote = p.add_argument_group("a running service instead of a model here")
    remote.add_argument("--url", default=None,
                        help="send the requests to the service at this address (its replicas batch them; the model "
                             "options above do not apply); 429 / 503 answers and lost connections are retried")
    remote.add_argument("--api-key", default=None, help="the service's key (default: $VLMGUARD_API_KEY)")
    remote.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="the longest wait for one answer (default 3600)")
    remote.add_argument("--retries", type=int, default=8, help="retries of an overloaded or lost request (default 8)")
    p.add_argument("--resume", action="store_true",
                   help="go on from an existing --output: requests it answered are not run again (those that "
                        "failed with a server error are)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.set_defaults(func=cmd_run_batch)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from vlmguard.workers.run_batch import BatchPlan

    if args.url is not None:
        if args.allowed_local_media_path is not None:
            raise InvalidInput("--allowed-local-media-path is the service's own setting (allowed_local_media_path "
                               "in its config), not taken with --url")
        if args.timeout <= 0 or args.retries < 0:
            raise InvalidInput("--timeout must be > 0 and --retries >= 0")
        plan = BatchPlan.make(args.input, args.output, args.resume)
        return _report(args, lambda: _remote(args, plan))
    if args.batch_wait_ms < 0:
        raise InvalidInput(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms:g}")
    if args.prefix_cache_mb < 0:
        raise InvalidInput(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb:g}")
    media = args.allowed_local_media_path
    if media is not None and not media.is_dir():
        raise InvalidInput(f"--allowed-local-media-path: no such folder: {media}")
    plan = BatchPlan.make(args.input, args.output, args.resume)  # a bad file fails before the model loads
    return _report(args, lambda: _local(args, plan, media))


def _local(args: argparse.Namespace, plan: Any, media: Path | None) -> Any:
    from vlmguard.workers.engine_worker import EngineWorker
    from vlmguard.workers.run_batch import run_batch

    name = args.served_model_name or args.model
    worker = EngineWorker(args.model, name=name, device=args.device, dtype=args.dtype,
                          attn_implementation=args.attn, trust_remote_code=args.trust_remote_code,
                          torch_threads=args.threads, prefix_cache_mb=args.prefix_cache_mb,
                          quantization=args.quantization)
    return run_batch(plan, {name: worker}, max_batch_size=args.max_batch_size, wait_s=args.batch_wait_ms / 1000,
                     concurrency=args.concurrency, max_new_tokens_limit=args.max_new_tokens_limit,
                     local_media=media, progress=not (args.quiet or args.json))


def _remote(args: argparse.Namespace, plan: Any) -> Any:
    from vlmguard.workers.run_batch import run_batch_remote

    return run_batch_remote(plan, args.url, args.api_key or os.environ.get("VLMGUARD_API_KEY") or None,
                            concurrency=args.concurrency or 16, timeout_s=args.timeout, max_retries=args.retries,
                            progress=not (args.quiet or args.json))


def _report(args: argparse.Namespace, run: Callable[[], Any]) -> int:
    """Run, then print the summary (``--json``: also as one JSON object); an interruption says where the answers
    so far are."""
    try:
        summary = run()
    except KeyboardInterrupt:
        print(f"run-batch: interrupted; the answers so far are in {args.output} (--resume goes on from it)",
              file=sys.stderr)
        raise
    line = (f"run-batch: {summary.requests} requests: {summary.ok} answered, {summary.failed} refused or failed"
            f"{f', {summary.skipped} answered before (--resume)' if summary.skipped else ''}; "
            f"{summary.seconds:.1f} s; answers in {args.output}")
    print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"command": "run-batch", "output": str(args.output), **summary.as_dict()}))
    return 0  # (requests the API refused are in the output, as OpenAI's batches keep them)
