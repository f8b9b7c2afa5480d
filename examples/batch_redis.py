"""BatchExecutor with Redis: 1,000 concurrent GETs become 2 MGETs, 1,000 SETs one MSET.

python examples/batch_redis.py [redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import redis.asyncio

from pgpilot.batch import BatchExecutor


async def main(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    commands: list[str] = []
    prefix = f"example:{uuid.uuid4().hex[:8]}:"  # runs at the same time do not share keys

    async def mset(pairs: list[tuple[str, str]]) -> list[bool]:
        commands.append(f"MSET x{len(pairs)}")
        await client.mset(dict(pairs))
        return [True] * len(pairs)

    async def mget(keys: list[str]) -> list[bytes | None]:
        commands.append(f"MGET x{len(keys)}")
        values: list[bytes | None] = await client.mget(keys)
        return values

    set_value = BatchExecutor(mset)
    get_value = BatchExecutor(mget, max_batch_size=500)
    try:
        # Many independent coroutines, each writing or reading one key.
        await asyncio.gather(*(set_value.submit((f"{prefix}{i}", str(i * i))) for i in range(1000)))
        values = await asyncio.gather(*(get_value.submit(f"{prefix}{i}") for i in range(1000)))
        assert values[7] == b"49"
        print("commands sent:", commands)  # ['MSET x1000', 'MGET x500', 'MGET x500']
        print("get stats:", get_value.stats.as_dict())
        await client.delete(*(f"{prefix}{i}" for i in range(1000)))
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/15"))
