"""A data.sources mixture with an s3:// source (moto's S3 server, as in test_s3.py) beside a local one: the
same batches as the mixture of local copies, and a resume from its state reads on exactly."""

import numpy as np
import pytest

from lmforge.data.mixture import MixtureLoader, Source, read_source_indexes
from lmforge.data.prepare import prepare

s3fs = pytest.importorskip("s3fs")
pytestmark = pytest.mark.slow  # the S3 server and a prepare: ~25 s
from tests.services.test_s3 import SHAKESPEARE, corpus, s3, s3_shards, tok_dir  # noqa: F401 (fixtures)


def test_mixture_of_an_s3_and_a_local_source(s3_shards, tok_dir, tmp_path):  # noqa: F811
    url, _ = s3_shards
    local = tmp_path / "plays"
    prepare([str(SHAKESPEARE)], tok_dir, local, val_fraction=0.05, txt_mode="blank", progress=False)
    copy = tmp_path / "copy"
    s3fs.S3FileSystem().get(f"{url.removeprefix('s3://')}/", str(copy), recursive=True)
    assert set(read_source_indexes([Source("web", url), Source("plays", str(local))])) == {"web", "plays"}

    def make(web_dir, cache):
        return MixtureLoader([Source("web", web_dir, 0.5), Source("plays", str(local), 0.5)], seq_len=32,
                             global_batch=4, seed=3, cache_dir=cache)

    remote, ref = make(url, tmp_path / "cache"), make(str(copy), None)
    for _ in range(3):
        assert np.array_equal(remote.next_batch(), ref.next_batch())
    assert remote.loaders[0].remote.downloads >= 1 and all(c > 0 for c in remote.cursors)
    resumed = make(url, tmp_path / "fresh")
    resumed.load_state_dict(remote.state_dict())
    for _ in range(2):
        assert np.array_equal(resumed.next_batch(), ref.next_batch())
