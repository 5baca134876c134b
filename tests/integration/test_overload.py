"""A bounded admission queue: a burst beyond max_queue_size is refused at once with UNAVAILABLE (429 through
the OpenAI gateway), the admitted requests finish correctly, and the server serves normally afterwards."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

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
    server = start_server(model_dir, tmp_path / "server.log", openai=True,
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

        # through the OpenAI gateway the same refusal is a 429, which the SDK raises as RateLimitError
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{server.openai}/v1", api_key="unused", max_retries=0)

        def via_openai(_: int) -> str | openai.APIStatusError:
            try:
                return sdk.completions.create(model="bucketserve", prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
            except openai.APIStatusError as e:
                return e

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(via_openai, range(16)))
        limited = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
        assert limited and all(isinstance(e, openai.RateLimitError) and e.response.headers["Retry-After"] == "1"
                               for e in limited), limited
        assert {o for o in outcomes if isinstance(o, str)} == {expected}
    finally:
        assert stop_server(server) == 0
