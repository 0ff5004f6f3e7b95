"""Redis memory per active card in the status mirror, measured with INFO memory (issue 12, item 4).

    python -m loadtests.mirror_memory --cards 1000000 [--capacity N] [--seed 1]

Starts a redis-server of its own (default settings: listpack limits 128 fields / 64 bytes, nothing
on disk), reads `used_memory`, fills --cards active cards through `RedisStatusMirror.mirror_many`
(2,000 per call, as the rebuild does), each with a realistic sealed disclosure profile (a Chinese
name of 2 to 4 characters, a masked 18-digit citizen ID of Sichuan, region 510000, sealed with
AES-GCM as the service does) and a mirror version of 1 to 30, reads `used_memory` again, and prints
the bytes per card, the bucket hashes' encodings (`OBJECT ENCODING` of every key), cards per bucket,
the longest value, the fill rate (cards/s of `mirror_many` alone: building the entries, sealing
included, is not counted), and Redis's and the client's CPU per card written (less distorted than
the rate by a loaded machine). The mirror is sized for --capacity cards (default: --cards), as
ECARD_MIRROR_CAPACITY sizes a deployment's. The server is stopped and its directory removed at the
end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import redis

from app.domain.cards.citizen_id import check_character, mask_citizen_id
from app.domain.verification.disclosure import Profile, seal_profile
from app.security.pii import PiiCipher
from app.stores.status_mirror import MIRROR_BATCH, MirroredStatus, MirrorEntry, RedisStatusMirror
from loadtests.redis_cluster import free_port

HOST = "127.0.0.1"
PREFIX = "ecard:"
REGION = "510000"
# Cards built (and sealed) at a time, then written: a million entries at once would hold ~1 GB here.
CHUNK = 100_000
# The commonest family names and given-name characters (a realistic mix of 2-, 3- and 4-character names,
# two-character family names included).
FAMILY_NAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢"
)
DOUBLE_FAMILY_NAMES = ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫")
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国志红玉梅文辉鹏飞婷雪琳晨宇浩然子涵梓萱一诺欣怡"


class OwnRedis:
    """A redis-server of this run's own, nothing on disk, so used_memory counts only what the run put in."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mirror-memory-"))
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
        )  # fmt: skip
        self.url = f"redis://{HOST}:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, socket_timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the run's redis-server did not start (is redis-server installed?)")

    def used_memory(self) -> int:
        """INFO memory's used_memory, bytes."""
        return int(self.client.info("memory")["used_memory"])

    def cpu_seconds(self) -> float:
        """INFO cpu: the server's user and system CPU so far."""
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def holder_profile(rng: random.Random) -> Profile:
    """A realistic profile: a 2-4 character name, a masked citizen ID of Chengdu, the insured region."""
    length = rng.choices((2, 3, 4), weights=(30, 65, 5))[0]
    family = rng.choice(DOUBLE_FAMILY_NAMES) if length == 4 and rng.random() < 0.7 else rng.choice(FAMILY_NAMES)
    name = family + "".join(rng.choice(GIVEN) for _ in range(length - len(family)))
    birth = f"{rng.randint(1940, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    first17 = f"5101{rng.randint(0, 99):02d}{birth}{rng.randint(0, 999):03d}"
    return Profile(name, mask_citizen_id(first17 + check_character(first17)), REGION)


def build_entries(pii: PiiCipher, rng: random.Random, count: int) -> list[MirrorEntry]:
    """count active cards with their sealed profiles, as `ecard status reconcile --repair` gives them."""
    entries = []
    for _ in range(count):
        card_ref = rng.randbytes(16)
        sealed = seal_profile(pii, card_ref, holder_profile(rng))
        entries.append(MirrorEntry(card_ref, rng.randint(1, 30), MirroredStatus.ACTIVE, sealed, None))
    return entries


def describe_buckets(client: redis.Redis) -> tuple[Counter[str], list[int], int]:
    """Every key's encoding, each bucket's number of cards, and the longest value seen in a sample."""
    encodings: Counter[str] = Counter()
    sizes: list[int] = []
    keys = list(client.scan_iter(match=f"{PREFIX}*", count=5000))
    for start in range(0, len(keys), 5000):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 5000]:
                pipe.object("encoding", key)
                pipe.hlen(key)
            replies = pipe.execute()
        encodings.update(encoding.decode() for encoding in replies[0::2])
        sizes += replies[1::2]
    longest = 0
    for key in keys[:200]:
        longest = max([longest, *(len(value) for value in client.hvals(key))])
    return encodings, sizes, longest


async def fill(mirror: RedisStatusMirror, cards: int, seed: int) -> tuple[float, float, list[bytes]]:
    """Fill the mirror; seconds spent in mirror_many (wall, and this process's CPU), and a sample of the cards."""
    pii = PiiCipher(os.urandom(32), os.urandom(32))
    rng = random.Random(seed)
    spent, cpu, sample = 0.0, 0.0, []
    for start in range(0, cards, CHUNK):
        entries = build_entries(pii, rng, min(CHUNK, cards - start))
        sample += [entry.card_ref for entry in entries[:100]]
        began, cpu_began = time.perf_counter(), time.process_time()
        for batch in range(0, len(entries), MIRROR_BATCH):
            written = await mirror.mirror_many(entries[batch : batch + MIRROR_BATCH])
            if written != len(entries[batch : batch + MIRROR_BATCH]):
                raise RuntimeError(f"mirror_many wrote {written} of {MIRROR_BATCH} new cards")
        spent += time.perf_counter() - began
        cpu += time.process_time() - cpu_began
        print(f"  {start + len(entries):,} cards", file=sys.stderr, flush=True)
    return spent, cpu, sample


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


async def run(cards: int, capacity: int, seed: int) -> None:
    """Measure, print the figures."""
    print(f"load average {_load()} (before)")
    server = OwnRedis()
    mirror = RedisStatusMirror.from_url(server.url, PREFIX, capacity=capacity)
    try:
        server.client.config_set("hash-max-listpack-entries", 128)  # the defaults, said out loud
        server.client.config_set("hash-max-listpack-value", 64)
        before, cpu_before = server.used_memory(), server.cpu_seconds()
        seconds, client_cpu, sample = await fill(mirror, cards, seed)
        after, cpu = server.used_memory(), server.cpu_seconds() - cpu_before
        statuses = await mirror.get_statuses(sample)
        if statuses != [MirroredStatus.ACTIVE.value] * len(sample):
            raise RuntimeError("a sampled card is not mirrored as active")
        encodings, sizes, longest = describe_buckets(server.client)
        info = server.client.info("memory")
        version = server.client.info("server")["redis_version"]
    finally:
        await mirror.close()
        server.stop()
    bits = mirror.layout.bits
    print(f"redis-server {version}, hash-max-listpack-entries 128, hash-max-listpack-value 64, prefix {PREFIX!r}")
    print(f"cards: {cards:,} active, each with a sealed profile; capacity {capacity:,} → {2**bits:,} buckets per shard")
    print(f"used_memory before {before:,} B, after {after:,} B: {after - before:,} B")
    print(f"bytes per card: {(after - before) / cards:.1f} (used_memory_dataset {info['used_memory_dataset']:,} B)")
    print(f"keys: {len(sizes):,}; encodings: {', '.join(f'{name} {count:,}' for name, count in encodings.items())}")
    print(f"cards per bucket: min {min(sizes)}, mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}")
    print(f"longest value in 200 buckets: {longest} B")
    print(f"fill rate (mirror_many alone): {cards / seconds:,.0f} cards/s ({seconds:.1f} s)")
    print(f"Redis CPU while filling: {cpu / cards * 1e6:.2f} µs per card ({cpu:.1f} s)")
    print(f"client CPU in mirror_many: {client_cpu / cards * 1e6:.2f} µs per card ({client_cpu:.1f} s)")
    print(f"load average {_load()} (after)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", type=int, default=1_000_000)
    parser.add_argument(
        "--capacity", type=int, default=None, help="the mirror's ECARD_MIRROR_CAPACITY (default: --cards)"
    )
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run it."""
    options = parse_args(argv)
    asyncio.run(run(options.cards, options.capacity or options.cards, options.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
