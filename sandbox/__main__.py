"""`python -m sandbox`: start the sandbox portal (see sandbox/README.md for every flag)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

from sandbox.app import create_app
from sandbox.config import (
    CANCELLED_STATUSES,
    DEFAULT_APPLICATION_TOKEN,
    DEFAULT_DURATIONS,
    DEFAULT_MEMBER_ID,
    DEFAULT_OPERATING_LIMIT,
    DEFAULT_OPERATING_WINDOW,
    DEFAULT_TOKEN_LIFETIME,
    LANGUAGES,
    PLAN_LIMITS,
    Config,
)
from sandbox.faults import FaultBook, FaultError
from sandbox.server import serve


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _duration(text: str) -> tuple[str, float]:
    method, sep, seconds = text.partition("=")
    if not sep or not method:
        raise argparse.ArgumentTypeError("expected METHOD=SECONDS")
    return method, float(seconds)


def _fault(text: str) -> dict[str, Any]:
    """A fault rule from the command line: JSON, or `KIND[,key=value...]` (method, times, rate, seconds)."""
    if text.lstrip().startswith("{"):
        try:
            rule = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    else:
        kind, *pairs = [part.strip() for part in text.split(",")]
        rule = {"kind": kind}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("method", "times", "rate", "seconds"):
                raise argparse.ArgumentTypeError(f"expected key=value with key method, times, rate or seconds: {pair!r}")
            if key == "method":
                rule[key] = value
            else:
                try:
                    rule[key] = int(value) if key == "times" else float(value)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"`{key}` must be a number") from None
    try:
        FaultBook(random.Random()).add(rule)
    except FaultError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return rule


def parse_args(argv: list[str]) -> Config:
    """Turn the command line into a Config."""
    parser = argparse.ArgumentParser(prog="python -m sandbox", description="Bitrix24 sandbox portal")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--documents", type=int, default=20, help="seed documents 1..N (all conducted)")
    parser.add_argument("--plan", choices=sorted(PLAN_LIMITS), default="standard")
    parser.add_argument("--language", choices=LANGUAGES, default="en")
    parser.add_argument("--rate", type=float, help="leak rate per second (default from --plan)")
    parser.add_argument("--burst", type=int, help="bucket size (default from --plan)")
    parser.add_argument("--operating-limit", type=float, default=DEFAULT_OPERATING_LIMIT)
    parser.add_argument("--operating-window", type=float, default=DEFAULT_OPERATING_WINDOW)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--durations-zero", action="store_true", help="simulated durations all 0")
    parser.add_argument("--duration", type=_duration, action="extend", nargs="+", default=[],
                        metavar="METHOD=SECONDS", help="simulated duration of one method (repeatable)")
    parser.add_argument("--cancelled-status", choices=CANCELLED_STATUSES, default="C")
    parser.add_argument("--latency", type=float, default=0.0, help="sleep before every /rest answer")
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="share of /rest calls answered 500")
    parser.add_argument("--drop-rate", type=_rate, default=0.0, help="share of /rest calls dropped")
    parser.add_argument("--fault", type=_fault, action="append", default=[], metavar="RULE",
                        help="a fault rule in force from the start (and after every reset): "
                             "KIND[,method=M][,times=N][,rate=F][,seconds=S] or the rule as JSON; repeatable")
    parser.add_argument("--token-lifetime", type=int, default=DEFAULT_TOKEN_LIFETIME)
    parser.add_argument("--application-token", default=DEFAULT_APPLICATION_TOKEN)
    parser.add_argument("--member-id", default=DEFAULT_MEMBER_ID)
    args = parser.parse_args(argv)

    rate, burst = PLAN_LIMITS[args.plan]
    durations = {m: 0.0 for m in DEFAULT_DURATIONS} if args.durations_zero else dict(DEFAULT_DURATIONS)
    durations.update(dict(args.duration))
    return Config(
        host=args.host, port=args.port, documents=args.documents, plan=args.plan, language=args.language,
        rate=args.rate if args.rate is not None else rate,
        burst=args.burst if args.burst is not None else burst,
        operating_limit=args.operating_limit, operating_window=args.operating_window, seed=args.seed,
        durations=durations, cancelled_status=args.cancelled_status, latency=args.latency,
        error_rate=args.error_rate, drop_rate=args.drop_rate, faults=args.fault,
        token_lifetime=args.token_lifetime,
        application_token=args.application_token, member_id=args.member_id,
    )


def main(argv: list[str] | None = None) -> None:
    """Build the portal and serve it until stopped."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    app = create_app(config)

    def announce() -> None:
        print(f"sandbox portal webhook: {config.webhook_url}", flush=True)
        print(f"sandbox portal page:    {config.root_url}/", flush=True)

    serve(app, config.host, config.port, announce)


if __name__ == "__main__":
    main()
