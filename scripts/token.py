"""Mint a connect token (a JWT): ``scripts/token --channels a,b --ttl 3600 [--sub user-42]``.

With ``CONNECT_SECRET`` set, /ws admits only clients presenting such a token (``?token=`` or
``Authorization: Bearer``), and only to the channels it names. By default the token is HS256, signed
with ``CONNECT_SECRET`` from the environment; with ``--private-key FILE`` (a PEM RSA or EC private
key) it is RS256 or ES256, for a service started with the matching ``CONNECT_PUBLIC_KEY``. The token
is printed on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from service.config import key_algorithm
from service.gate import TokenError, mint_with_key


def _private_key(path: str) -> tuple[Any, str]:
    """The key in ``path`` and the algorithm the service verifies it with (the rule of CONNECT_PUBLIC_KEY)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(path, "rb") as pem:
        key: Any = load_pem_private_key(pem.read(), password=None)
    return key, key_algorithm(key.public_key())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/token", description=__doc__)
    parser.add_argument(
        "--channels",
        required=True,
        help="comma list of channels the client may subscribe to; * for any",
    )
    parser.add_argument("--ttl", type=float, default=3600.0, help="seconds until the token expires (default 3600)")
    parser.add_argument("--sub", help="the client's identity (the sub claim), shown in the service's log lines")
    parser.add_argument(
        "--private-key",
        metavar="FILE",
        help="sign RS256/ES256 with this PEM private key instead of HS256 with CONNECT_SECRET",
    )
    args = parser.parse_args(argv)
    if not args.ttl > 0:
        parser.error("--ttl must be a positive number of seconds")
    channels = [c for c in (part.strip() for part in args.channels.split(",")) if c]
    if not channels:
        parser.error("--channels needs at least one channel name")
    key: Any
    if args.private_key:
        try:
            key, algorithm = _private_key(args.private_key)
        except (OSError, ValueError, TypeError) as exc:
            print(f"token: cannot use {args.private_key!r} as a private key: {exc}", file=sys.stderr)
            return 2
    else:
        # The secret comes only from the environment: a command-line argument would show in `ps`.
        key, algorithm = os.environ.get("CONNECT_SECRET", ""), "HS256"
        if not key:
            print("token: CONNECT_SECRET is not set; export the same secret the service runs with", file=sys.stderr)
            return 2
    try:
        print(mint_with_key(key, algorithm, channels, args.ttl, sub=args.sub))
    except TokenError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
