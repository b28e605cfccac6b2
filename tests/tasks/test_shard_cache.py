"""A peer machine's cache of fetched shards: peers sharing it (make run's share one process) fetch safely at once."""

from __future__ import annotations

import threading
import time

from tasks import training
from tasks.training import ShardCache


def test_two_peers_of_one_process_fetching_one_object_at_once_both_get_it(tmp_path, monkeypatch):
    both_writing = threading.Barrier(2)

    def download(grant, path, limit):  # two downloads overlapping in time, as two peers' would
        with path.open("wb") as out:
            out.write(b"label,f0\n")
            both_writing.wait(5)
            time.sleep(0.05)
            out.write(b"1,2\n")
        return 13

    monkeypatch.setattr(training.transfer, "download", download)
    cache = ShardCache(tmp_path / "shards")
    found, errors = [], []

    def fetch():
        try:
            found.append(cache.fetch("grant", "users/u/sessions/s/shards/train.csv"))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len({path for path, _ in found}) == 1 and found[0][0].read_bytes() == b"label,f0\n1,2\n"
    assert list((tmp_path / "shards").glob("*.part")) == []
