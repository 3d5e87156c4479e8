"""Mint a connect token: ``scripts/token --channels a,b --ttl 3600``.

With ``CONNECT_SECRET`` set, /ws admits only clients presenting such a token (``?token=`` or
``Authorization: Bearer``), and only to the channels it names. The token is printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

from service.gate import TokenError, mint_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/token", description=__doc__)
    parser.add_argument(
        "--channels",
        required=True,
        help="comma list of channels the client may subscribe to; * for any",
    )
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds until the token expires (default 3600)")
    args = parser.parse_args(argv)
    # The secret comes only from the environment: a command-line argument would show in `ps`.
    secret = os.environ.get("CONNECT_SECRET", "")
    if not secret:
        print("token: CONNECT_SECRET is not set; export the same secret the service runs with", file=sys.stderr)
        return 2
    if not args.ttl > 0:
        parser.error("--ttl must be a positive number of seconds")
    channels = [c for c in (part.strip() for part in args.channels.split(",")) if c]
    if not channels:
        parser.error("--channels needs at least one channel name")
    try:
        print(mint_token(secret, channels, args.ttl))
    except TokenError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
