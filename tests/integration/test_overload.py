"""A bounded admission queue: a burst beyond max_queue_size is refused at once with UNAVAILABLE, the
admitted requests finish correctly, and the server serves normally afterwards."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bucketserve_client import BucketServeClient
from bucketserve_client.client import BucketServeError

from .conftest import start_server, stop_server

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
PROMPT = "def handle(request):\n    return"


def small_queue_repository(dest: Path, max_queue_size: int, max_num_seqs: int) -> Path:
    """The documented bucketserve model alone, with a short queue and few slots."""
    shutil.copytree(REPOSITORY / "bucketserve", dest / "bucketserve")
    config = dest / "bucketserve" / "config.pbtxt"
    text = config.read_text()
    for key, value in (("max_queue_size", max_queue_size), ("max_num_seqs", max_num_seqs)):
        text, n = re.subn(rf'(key: "{key}"\n  value: {{ string_value: )"\d+"', rf'\1"{value}"', text)
        assert n == 1, key
    config.write_text(text)
    return dest


def test_a_burst_beyond_the_queue_is_refused_with_unavailable(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path / "server.log",
                          repository=small_queue_repository(tmp_path / "repo", max_queue_size=2, max_num_seqs=1))
    try:
        client = BucketServeClient(server.grpc_url)
        expected = client.generate(PROMPT, max_tokens=32, temperature=0).text

        def one(_: int) -> str | BucketServeError:
            try:
                return BucketServeClient(server.grpc_url).generate(PROMPT, max_tokens=32, temperature=0).text
            except BucketServeError as e:
                return e

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(16)))
        refused = [o for o in outcomes if isinstance(o, BucketServeError)]
        served = [o for o in outcomes if isinstance(o, str)]
        # one running and two waiting at a time: the rest of a simultaneous burst is refused
        assert len(served) >= 3 and len(refused) >= 1 and len(served) + len(refused) == 16
        assert set(served) == {expected}
        assert all("server is overloaded" in str(e) and "max_queue_size 2" in str(e) for e in refused), refused
        assert client.generate(PROMPT, max_tokens=32, temperature=0).text == expected  # served again at once
    finally:
        assert stop_server(server) == 0
