"""Publish one message: ``scripts/publish CHANNEL JSON``.

By default it PUBLISHes the documented frame straight to Redis (REDIS_URL, REDIS_PREFIX), which is
what any service may do; with ``--http URL`` it goes through POST /publish with PUBLISH_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import codec
from service.config import CHANNEL_RE, Settings, SettingsError
from service.keys import Keys


async def _via_redis(settings: Settings, channel: str, data: object) -> int:
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        return int(await redis.publish(Keys(settings.redis_prefix).channel(channel), codec.publication(channel, data)))
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/publish", description=__doc__)
    parser.add_argument("channel")
    parser.add_argument("data", help="the JSON value clients receive as data")
    parser.add_argument("--http", metavar="URL", help="service base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=os.environ.get("PUBLISH_TOKEN", ""), help="default: $PUBLISH_TOKEN")
    parser.add_argument("--redis-url", help="default: $REDIS_URL")
    args = parser.parse_args(argv)
    if not CHANNEL_RE.fullmatch(args.channel):
        parser.error("channel names match [A-Za-z0-9_.:-]{1,128}")
    try:
        data = codec.loads(args.data)
    except codec.JSONDecodeError:
        parser.error(f"data is not valid JSON: {args.data!r} (quote strings: '\"text\"')")
    if args.http:
        response = httpx.post(
            args.http.rstrip("/") + "/publish",
            json={"channel": args.channel, "data": data},
            headers={"Authorization": f"Bearer {args.token}"},
            timeout=10,
        )
        print(response.status_code, response.text)
        return 0 if response.status_code == 202 else 1
    env = dict(os.environ)
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    try:
        settings = Settings.from_env(env)
        receivers = asyncio.run(_via_redis(settings, args.channel, data))
    except SettingsError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:
        print(f"publish: Redis unreachable: {exc}", file=sys.stderr)
        return 2
    print(f"published to {args.channel!r}: {receivers} workers subscribed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
