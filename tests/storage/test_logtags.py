"""Storage's log tags: keyed, so they cannot be recomputed from session ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from storage import logtags
from storage.outbox_files import event_file_name, log_tag
from storage.spool_format import tag


@pytest.fixture(autouse=True)
def restore_key() -> Iterator[None]:
    saved = logtags._key
    yield
    logtags._key = saved


def test_a_spool_tag_is_keyed_and_changes_with_the_key() -> None:
    key = "org-a/sess-1"
    logtags.configure(b"a" * 32)
    first = tag(key)
    assert first.startswith("k_") and len(first) == 14 and tag(key) == first
    # Not the unkeyed digest anyone holding the session ids could compute.
    assert first != "k_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    logtags.configure(b"b" * 32)
    assert tag(key) != first  # rotating the pseudonym key unlinks old tags from new


def test_an_outbox_tag_does_not_show_the_file_names_digest() -> None:
    name = event_file_name("pose-session:org-a:sess-1")
    logtags.configure(b"a" * 32)
    got = log_tag(name)
    assert got.startswith("e_") and name.rsplit(".", 1)[-1] not in got
    assert "sess-1" not in got
