"""Full-collection pause of the memory store at a steady state: N requests reserved and settled.

    PYTHONPATH=$PWD python bench/memory_gc.py 360000

360,000 is two minutes at 3,000 requests/s: the settled ids the store keeps (SETTLED_TTL_MS) and
a full settlement-log ring (100,000). Prints the time of a full `gc.collect()` (5 runs) and the
objects the collector tracks. Compare checkouts by PYTHONPATH (bench/results/memory-gc.md).
"""
import asyncio, gc, time, sys
from proxy.stores.memory import MemoryStore
from proxy.stores.base import Counter, Note
NOW=1_900_000_000.0
class Clock:
    now=NOW
    def __call__(self): return self.now
async def main():
    store = MemoryStore(clock=Clock())
    cs = (Counter("{bp}:w:d1", "org:acme", 10**12, -1, int((NOW+600)*1000)), Counter("{bp}:w:d1", "user:acme/u", -1, -1, int((NOW+600)*1000)))
    for i in range(int(sys.argv[1])):
        rid=f"r{i}"
        await store.reserve(rid, cs, 1, 0, int((NOW + 5) * 1000), False, '["acme","u","gpt-4o-mini"]')
        await store.commit(rid, cs, 1, 0, Note("ok", "13 0 2 0", "3"))
    for _ in range(3): gc.collect()
    ts=[]
    for _ in range(5):
        t=time.perf_counter(); gc.collect(); ts.append((time.perf_counter()-t)*1000)
    print(f"full collection ms: min {min(ts):.1f} median {sorted(ts)[2]:.1f}; tracked objects {len(gc.get_objects())}")
asyncio.run(main())
