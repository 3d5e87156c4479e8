"""Publish one message: ``scripts/publish CHANNEL JSON``.

The JSON text is checked and forwarded byte for byte: subscribers receive exactly what was typed.
By default it publishes the documented frame straight to Redis (REDIS_URL, REDIS_PREFIX; with
REDIS_CLUSTER=1 on the master serving the channel), which is what any service may do; with
``--http URL`` it goes through ``POST /publish/<channel>`` with PUBLISH_TOKEN.
``--idempotency-key KEY`` makes a retry within IDEMPOTENCY_WINDOW return the first result instead
of publishing again.

Exit codes: 0 published; 1 the service refused it (HTTP 4xx/5xx other than 503 unknown);
2 bad input or nothing published (Redis unreachable); 3 unknown whether it was published (Redis
did not answer): retry with the same idempotency key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import httpx
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from service import publisher
from service.config import Settings, SettingsError
from service.publication import InvalidPublication, check_data
from service.wire import CHANNEL_RULE, is_channel


async def _via_redis(settings: Settings, channel: str, data: bytes, key: str | None) -> publisher.Published:
    # On a Redis Cluster, the cluster client finds the master serving the channel.
    options: dict[str, Any] = {"socket_connect_timeout": 3, "socket_timeout": settings.redis_command_timeout}
    redis: Redis | RedisCluster
    if settings.redis_cluster:
        try:
            redis = RedisCluster.from_url(settings.redis_url, **options)
        except (RedisError, RedisClusterException) as exc:
            raise publisher.Refused(str(exc) or type(exc).__name__) from exc
    else:
        redis = Redis.from_url(settings.redis_url, **options)
    try:
        return await publisher.publish(redis, channel, data, idempotency_key=key, settings=settings)
    finally:
        await redis.aclose()


def _via_http(base: str, token: str, channel: str, data: bytes, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = httpx.post(f"{base.rstrip('/')}/publish/{channel}", content=data, headers=headers, timeout=30)
    replay = " (replay)" if response.headers.get("idempotent-replay") == "true" else ""
    print(response.status_code, response.text + replay)
    if response.status_code == 202:
        return 0
    if response.status_code == 503 and response.headers.get("content-type", "").startswith("application/json"):
        return 3 if response.json().get("published") == "unknown" else 2
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("channel")
    parser.add_argument("data", help="the JSON text clients receive as data, byte for byte")
    parser.add_argument("--http", metavar="URL", help="service base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", default=os.environ.get("PUBLISH_TOKEN", ""), help="default: $PUBLISH_TOKEN")
    parser.add_argument("--redis-url", help="default: $REDIS_URL")
    parser.add_argument("--idempotency-key", metavar="KEY", help="1-200 printable characters; retries are safe")
    args = parser.parse_args(argv)
    if not is_channel(args.channel):
        parser.error(CHANNEL_RULE)
    try:
        publisher.check_key(args.idempotency_key)
        data = check_data(os.fsencode(args.data))
    except InvalidPublication as exc:
        hint = " (quote strings: '\"text\"')" if "not valid JSON" in str(exc) else ""
        parser.error(f"{exc}: {args.data[:200]!r}{hint}")
    if args.http:
        return _via_http(args.http, args.token, args.channel, data, args.idempotency_key)
    env = dict(os.environ)
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    try:
        settings = Settings.from_env(env)
        result = asyncio.run(_via_redis(settings, args.channel, data, args.idempotency_key))
    except SettingsError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    except publisher.Refused as exc:
        print(f"publish: Redis unreachable, nothing published: {exc}", file=sys.stderr)
        return 2
    except publisher.Unknown as exc:
        print(
            f"publish: Redis did not answer ({exc}); it may have been published: retry with the same "
            "--idempotency-key",
            file=sys.stderr,
        )
        return 3
    except publisher.IdempotencyConflict as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    replay = " (replay of the first result for this idempotency key)" if result.replay else ""
    print(f"published to {args.channel!r} at offset {result.offset} (epoch {result.epoch}): "
          f"{result.workers} workers subscribed{replay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
