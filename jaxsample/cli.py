"""The ``jaxsample`` command.

    jaxsample generate --prompt "What is the capital of France?" --temperature 0.7 --seed 1
    jaxsample generate --request body.json      # or - for stdin; prints a chat.completion
    jaxsample generate --request body.json --endpoint completions   # a /v1/completions body

``--prompt`` is sent as one user message through the model's chat template (``--raw`` sends
it as plain text). Every sampling parameter has a flag; the flags are turned into an
OpenRouter request body and validated exactly like ``--request`` bodies.

The command keeps XLA's compiled programs in a persistent cache (``$JAXSAMPLE_MODEL_DIR``
or ``~/.cache/jaxsample``, folder ``xla``) and the traced decode loop beside the kernels
(``programs``, :mod:`jaxsample.engine.programs`): the first run traces and compiles the
decode loop (tens of seconds on a small CPU), later runs with the same shapes load both.
``--no-compile-cache`` turns both off; a cache directory already set in JAX's own
configuration is left alone.

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


class UsageError(Exception):
    """A bad flag or file the command refuses with exit status 2 (its message is printed)."""


def seed_flag(text: str) -> int:
    """argparse type of ``--job-seed``: a signed 64-bit integer, as a request's ``seed``."""
    from jaxsample.params import INT64_MAX, INT64_MIN

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"{value}: must be an integer in [-2**63, 2**63 - 1]")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The model and engine flags that ``generate`` and ``batch`` share."""
    parser.add_argument("--model", default=None, help="a Llama GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        help="tokens of prompt + output per request (default: the model's context, at most 2048)",
    )
    parser.add_argument(
        "--job-seed", type=seed_flag, default=0, help="seeds the requests without one"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsample", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion with the model")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message (chat template applied)")
    src.add_argument("--request", help="a chat-completions request body as JSON file, or -")
    gen.add_argument(
        "--endpoint",
        choices=["chat", "completions"],
        default="chat",
        help="the --request body's endpoint: chat (/v1/chat/completions, the default) or "
        "completions (/v1/completions, OpenAI's legacy text completions)",
    )
    gen.add_argument("--raw", action="store_true", help="send --prompt as plain text")
    add_engine_flags(gen)
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


#: The most slots ``generate`` gives its one request (its choices run side by side).
GENERATE_SLOTS = 16


def _body_from_flags(args) -> dict:
    if args.endpoint != "chat":
        raise UsageError("--endpoint completions goes with --request (a /v1/completions body)")
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
            raise UsageError(f"--logit-bias is not JSON: {err}") from err
    if args.logprobs:
        body["logprobs"] = True
    if args.logprobs_mode is not None:
        body["logprobs_mode"] = args.logprobs_mode
    if args.response_format is not None:
        body["response_format"] = {"type": args.response_format}
    if args.stop is not None:
        body["stop"] = args.stop
    return body


#: generate's flags that set a request field: with --request the body sets every field
_BODY_FLAGS = (*_SAMPLING_FLAGS, "logit_bias", "logprobs", "logprobs_mode", "response_format")


def _read_request(args) -> dict:
    given = [
        "--" + name.replace("_", "-")
        for name in (*_BODY_FLAGS, "stop")
        if getattr(args, name) is not None
    ] + (["--raw"] if args.raw else [])
    if given:  # nothing given is dropped: the body is the whole request
        raise UsageError(
            f"--request takes every request field from the body; {', '.join(given)} given too"
            " (put them in the body)"
        )
    path = args.request
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as err:
        raise UsageError(f"cannot read the request {path}: {err.strerror}") from err
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"the request is not JSON: {err}") from err


def _prompt_count(body: dict, endpoint: str) -> int:
    """How many prompts a body has (a text-completions ``prompt`` may list several, each
    with ``n`` choices): the command's engine gets a slot per choice (at most 16)."""
    prompt = body.get("prompt")
    if endpoint == "completions" and isinstance(prompt, list):
        return max(1, sum(isinstance(x, (str, list)) for x in prompt))
    return 1


def _dumps(obj) -> str:
    """Strict JSON: NaN and infinity are refused (``allow_nan=False``), never written. Text
    stays as it is unless it holds a lone surrogate (a request may escape one, ``"\\ud800"``,
    and a refusal names the field it came in), which has no UTF-8 form: then ``\\u``
    escapes."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=2, ensure_ascii=True, allow_nan=False)
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("batch", "batch-merge"):
        from jaxsample.batch.command import run as run_batch

        status = run_batch(args)
        if argv is None:  # a program: its work is done, and a late Ctrl-C (while JAX shuts
            # down) would print a traceback and exit with -2 after a complete job
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return status
    try:
        body = _read_request(args) if args.request else _body_from_flags(args)
        if args.model is not None and not os.path.isfile(args.model):
            raise UsageError(f"no model file {args.model}")
    except UsageError as err:
        print(f"jaxsample: {err}", file=sys.stderr)
        return 2

    import jax.numpy as jnp

    from jaxsample.api import Engine, error_response
    from jaxsample.model import ModelFileError, ModelNotFoundError
    from jaxsample.params import InvalidRequestError, SamplingParams, request_n

    try:  # refuse a bad body before loading anything
        SamplingParams.from_request(body, endpoint=args.endpoint)
        n = request_n(body.get("n")) * _prompt_count(body, args.endpoint)
    except InvalidRequestError as err:
        print(_dumps(error_response(err)), file=sys.stdout if args.request else sys.stderr)
        return 2

    try:
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        # Engine checks --max-seq-len against the model's context when built
        # one request: as many slots as its choices (a power of two, at most 16; the answers
        # do not depend on it), not the 16 slots of a 2048-token cache each (2.4 GB zeroed
        # at start with SmolLM2, and every step computing 16 rows for one answer)
        engine = Engine.load(
            args.model,
            dtype=dtype,
            max_seq_len=args.max_seq_len,
            compile_cache=not args.no_compile_cache,
            slots=min(GENERATE_SLOTS, 1 << (n - 1).bit_length()),
        )
    except (ModelNotFoundError, ModelFileError) as err:
        print(f"jaxsample: {err}", file=sys.stderr)
        return 1
    except InvalidRequestError as err:
        print(
            f"jaxsample: --max-seq-len {args.max_seq_len}: must be {err.allowed}", file=sys.stderr
        )
        return 2
    if args.endpoint == "completions":
        response = engine.text_completion(body, job_seed=args.job_seed)
    else:
        response = engine.chat_completion(body, job_seed=args.job_seed)
    if "error" in response:  # 2: the request's fault; 1: it failed unexpectedly
        print(_dumps(response), file=sys.stdout if args.request else sys.stderr)
        return 1 if response["error"]["type"] == "server_error" else 2
    if args.request or args.json:
        print(_dumps(response))
    else:  # the text of each choice (--n), separated by a blank line
        print("\n\n".join(c["message"]["content"] for c in response["choices"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
