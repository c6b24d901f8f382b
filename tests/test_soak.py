"""A short soak in CI: the whole pipeline for about a minute, memory and fds flat."""
from __future__ import annotations

from broker.bench import soak

# After warm-up. The recorder legitimately holds up to its window (16 frames, 15 MB at
# 640x480x3) in flight, so the bound is 32 MB; leaking one frame a second would exceed
# it within the 33 s measured. The broker's buffer pool is measured apart: it may grow
# to --max-pending frames when a consumer stalls, and keeps them.
RSS_BOUND_MB = 32


def test_short_soak_memory_and_fds_stay_flat():
    res = soak.soak(seconds=45, fps=200, interval=2.0, warmup=12)
    assert res["returncode"] == 0, res["stderr_tail"]
    stages = res["run"]["stages"]
    assert stages["processed"]["frames"] == stages["published"]["frames"], stages
    assert stages["recorded"]["frames"] == stages["published"]["frames"] > 0, stages
    parts = {name.split("-")[0] for name in res["growth"]}
    assert parts == {"serve", "sink", "worker", "record"}, res["growth"]
    for name, g in res["growth"].items():
        # the broker's buffer pool may grow by design (a stalled consumer lets frames pile
        # up to --max-pending; the pool keeps them): what is beyond it must stay flat
        assert g.get("rss_mb_beyond_pool", g["rss_mb_growth"]) <= RSS_BOUND_MB, res["growth"]
        # a sample can catch a file or socket being opened; a leak grows every second
        assert g["fds_growth"] <= 4, res["growth"]
