"""The jobs' command line: `python -m pipelines.<job> [PRESET | FILE.yaml] [key.path=value ...] [--debug]`.

`--help` prints the presets and every key with its default. A user's own mistake (a bad key or value, a missing
file or model, a malformed dataset row, a run directory that cannot be resumed, a corrupt checkpoint) stops the job
with one line, `error: ...`, and exit code 2; `--debug` (or SPECMOE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from pipelines.config import load_config, presets, to_dict
from pipelines.schema import JOBS


def user_errors() -> tuple[type, ...]:
    """The exceptions that mean "your input is wrong", from every layer (each names the input in its message)."""
    from actors.zoo import ModelNotFound
    from pipelines.data import DataError
    from pipelines.runs import JsonlError, RunDirError
    from pipelines.schema import ConfigError
    from quant.base import QuantConfigError
    from quant.checkpoint import CheckpointError
    from quant.perplexity import TextSourceError

    return (ConfigError, DataError, RunDirError, JsonlError, ModelNotFound, QuantConfigError, CheckpointError,
            TextSourceError)


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("SPECMOE_DEBUG", "") not in ("", "0"), rest


def _fail(exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_cli(job: str, argv: list[str]):
    """`--help` prints the defaults; config errors exit with a one-line message."""
    debug, argv = _debug(argv)
    schema = JOBS[job]
    if argv and argv[0] in ("-h", "--help"):
        import yaml

        print(f"usage: python -m pipelines.{job} [PRESET | FILE.yaml] [key.path=value ...] [--debug]\n")
        print(f"presets: {presets(job)}\nkeys, with their choices and bounds: docs/config.md\n\ndefaults:")
        print(yaml.safe_dump(to_dict(schema()), sort_keys=False))
        sys.exit(0)
    try:
        return load_config(schema, job, argv)
    except user_errors() as exc:
        if debug:
            raise
        _fail(exc)


def run_cli(job: str, run, argv: list[str] | None = None) -> None:
    """`python -m pipelines.<job>`: parse, run, and turn a user error found later (while checking data, models or
    checkpoints before any model is loaded) into the same one-line message."""
    argv = sys.argv[1:] if argv is None else argv
    debug, _ = _debug(argv)
    cfg = parse_cli(job, argv)
    try:
        run(cfg)
    except user_errors() as exc:
        if debug:
            raise
        _fail(exc)
