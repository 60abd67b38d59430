"""Serve a GGUF model with llama.cpp's OpenAI-compatible server on 127.0.0.1, from Python.

Uses the prebuilt CPU wheels of `xllamacpp` (pip install xllamacpp), so no compiler and no
separate llama-server binary are needed; tests and bench/server_cpu.py start it this way.

    python scripts/llamacpp_server.py --port 8080 --slots 4 --threads 2
    # then: --set model.backend=openai --set model.base_url=http://127.0.0.1:8080/v1

Prints one line `listening http://127.0.0.1:PORT` once the model is loaded (port 0: a free
port picked by the OS), then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a .gguf path or an embedded prefloop model name")
    ap.add_argument("--alias", default="smollm2", help="the model name the server reports")
    ap.add_argument("--port", type=int, default=0, help="0: any free port")
    ap.add_argument("--slots", type=int, default=1, help="requests decoded together")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot (prompt + new)")
    args = ap.parse_args(argv)

    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = _gguf(args.model)
    params.model_alias = {args.alias}  # a set of names in this binding
    params.hostnames = ["127.0.0.1"]  # never reachable from another machine
    params.port = args.port
    params.n_parallel = args.slots
    params.n_ctx = args.ctx * args.slots  # llama.cpp splits n_ctx evenly over the slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    server = xlc.Server(params)
    print(f"listening {server.listening_address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    return 0


def _gguf(model: str) -> str:
    if model.endswith(".gguf"):
        return model
    from prefloop.models import embedded_gguf_path

    return str(embedded_gguf_path(model))


if __name__ == "__main__":
    sys.exit(main())
