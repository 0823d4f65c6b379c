"""The ``jaxsample`` command.

    jaxsample generate --prompt "What is the capital of France?" --temperature 0.7 --seed 1
    jaxsample generate --request body.json      # or - for stdin; prints a chat.completion

``--prompt`` is sent as one user message through the model's chat template (``--raw`` sends
it as plain text). Every sampling parameter has a flag; the flags are turned into an
OpenRouter request body and validated exactly like ``--request`` bodies.

The command keeps XLA's compiled programs in a persistent cache (``$JAXSAMPLE_MODEL_DIR``
or ``~/.cache/jaxsample``, folder ``xla``): the first run compiles the decode loop (tens of
seconds on a small CPU), later runs with the same shapes load it. ``--no-compile-cache``
turns it off; a cache directory already set in JAX's own configuration is left alone.

JSON is written strictly (``allow_nan=False``): a response never holds NaN or infinity.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# flag name -> (request field, type)
_SAMPLING_FLAGS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "frequency_penalty": float,
    "presence_penalty": float,
    "repetition_penalty": float,
    "min_p": float,
    "top_a": float,
    "seed": int,
    "max_tokens": int,
    "top_logprobs": int,
    "n": int,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsample", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion with the model")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message (chat template applied)")
    src.add_argument("--request", help="a chat-completions request body as JSON file, or -")
    gen.add_argument("--raw", action="store_true", help="send --prompt as plain text")
    gen.add_argument("--model", default=None, help="path of a Llama GGUF file")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--job-seed", type=int, default=0, help="seed for requests without one")
    gen.add_argument("--json", action="store_true", help="print the chat.completion JSON")
    for name, typ in _SAMPLING_FLAGS.items():
        gen.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    gen.add_argument("--logit-bias", dest="logit_bias", default=None, help='JSON: {"123": -5}')
    gen.add_argument("--logprobs", action="store_true", default=None)
    gen.add_argument("--logprobs-mode", choices=["raw", "processed"], default=None)
    gen.add_argument("--response-format", dest="response_format", choices=["text", "json_object"])
    gen.add_argument("--stop", action="append", default=None, help="a stop string (repeat)")
    gen.add_argument(
        "--no-compile-cache", action="store_true", help="do not keep compiled programs on disk"
    )
    from jaxsample.batch.command import add_parsers as add_batch_parsers

    add_batch_parsers(sub)  # batch, batch-merge (docs/batch.md)
    return parser


def _enable_compile_cache() -> None:
    """Persistent XLA compilation cache under the jaxsample cache folder (unless JAX already
    has one configured)."""
    import jax

    from jaxsample.model.gguf_file import cache_dir

    if jax.config.jax_compilation_cache_dir:
        return
    path = cache_dir() / "xla"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: run without the cache
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _body_from_flags(args) -> dict:
    content = args.prompt
    body: dict = (
        {"prompt": content} if args.raw else {"messages": [{"role": "user", "content": content}]}
    )
    for name in _SAMPLING_FLAGS:
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.logit_bias is not None:
        try:
            body["logit_bias"] = json.loads(args.logit_bias)
        except json.JSONDecodeError as err:
            raise SystemExit(f"jaxsample: --logit-bias is not JSON: {err}") from err
    if args.logprobs:
        body["logprobs"] = True
    if args.logprobs_mode is not None:
        body["logprobs_mode"] = args.logprobs_mode
    if args.response_format is not None:
        body["response_format"] = {"type": args.response_format}
    if args.stop is not None:
        body["stop"] = args.stop
    return body


def _read_request(path: str) -> dict:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"jaxsample: the request is not JSON: {err}") from err


def _dumps(obj) -> str:
    """Strict JSON: NaN and infinity are refused (``allow_nan=False``), never written."""
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("batch", "batch-merge"):
        from jaxsample.batch.command import run as run_batch

        return run_batch(args)
    body = _read_request(args.request) if args.request else _body_from_flags(args)

    import jax.numpy as jnp

    from jaxsample.api import Engine, error_response
    from jaxsample.model import ModelNotFoundError
    from jaxsample.params import InvalidRequestError, SamplingParams

    try:  # refuse a bad body before loading anything
        SamplingParams.from_request(body)
    except InvalidRequestError as err:
        print(_dumps(error_response(err)), file=sys.stdout if args.request else sys.stderr)
        return 2

    if not args.no_compile_cache:
        _enable_compile_cache()
    try:
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        engine = Engine.load(args.model, dtype=dtype)
    except ModelNotFoundError as err:
        print(f"jaxsample: {err}", file=sys.stderr)
        return 1
    response = engine.chat_completion(body, job_seed=args.job_seed)
    if "error" in response:
        print(_dumps(response), file=sys.stdout if args.request else sys.stderr)
        return 2
    if args.request or args.json:
        print(_dumps(response))
    else:  # the text of each choice (--n), separated by a blank line
        print("\n\n".join(c["message"]["content"] for c in response["choices"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
