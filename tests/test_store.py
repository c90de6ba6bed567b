"""The store: one code path for file:// and a real S3-protocol server."""

import pyarrow as pa
import pytest

from semisup_tasks.store import Store, StoreError, clean_key


def exercise(store: Store) -> None:
    store.write_bytes("a/b/c.bin", b"xyz")
    assert store.read_bytes("a/b/c.bin") == b"xyz"
    assert store.exists("a/b/c.bin") and not store.exists("a/b/missing")
    store.write_json("a/doc.json", {"k": [1, 2]})
    assert store.read_json("a/doc.json") == {"k": [1, 2]}
    table = pa.table({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    store.write_table("t/part.parquet", table)
    assert store.read_table("t/part.parquet").equals(table)
    assert store.read_table("t/part.parquet", columns=["y"]).column_names == ["y"]
    assert store.list("a") == ["a/b/c.bin", "a/doc.json"]
    assert store.list() == ["a/b/c.bin", "a/doc.json", "t/part.parquet"]
    assert store.url("a/doc.json").endswith("/a/doc.json")
    with pytest.raises(StoreError, match="does not exist"):
        store.read_bytes("nope")
    store.write_bytes("a/b/c.bin", b"new")  # overwrite is whole
    assert store.read_bytes("a/b/c.bin") == b"new"
    store.delete_prefix("a")
    assert store.list("a") == []


def test_file_store(tmp_path):
    exercise(Store.from_uri(f"file://{tmp_path}/root"))


def test_relative_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store.from_uri("file://./.semisup/store")
    store.write_bytes("k", b"1")
    assert (tmp_path / ".semisup" / "store" / "k").read_bytes() == b"1"


def test_s3_store(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="semisup-test")
    store = Store.from_uri("s3://semisup-test/some/prefix")
    store.check()
    exercise(store)
    # the prefix is honoured: keys live under it in the bucket
    store.write_bytes("z", b"1")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="semisup-test")["Contents"]]
    assert "some/prefix/z" in keys and all(k.startswith("some/prefix/") for k in keys)


def test_unreachable_bucket_is_one_sentence(s3_server):
    with pytest.raises(StoreError, match="Could not reach bucket 'no-such-bucket'"):
        Store.from_uri("s3://no-such-bucket/x").check()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "..\\x", "a\\..\\..\\x"])
def test_keys_cannot_escape_the_root(key):
    with pytest.raises(StoreError, match="escapes"):
        clean_key(key)


@pytest.mark.parametrize("key", ["a\x00b", "runs/x\n/y", "a/\x1b[31mred", "a\x7fb", "a\x85b"])
def test_keys_with_control_characters_are_refused(key, tmp_path):
    with pytest.raises(StoreError, match="control character"):
        Store.from_uri(f"file://{tmp_path}/root").write_bytes(key, b"1")
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*"))


def test_keys_are_literal_not_url_decoded(tmp_path):
    # a file named with %-escapes is that file, and an encoded '..' is only a folder name
    assert clean_key("photos/photo%201.png") == "photos/photo%201.png"
    store = Store.from_uri(f"file://{tmp_path}/root")
    store.write_bytes("a/%2e%2e/%2e%2e/x", b"1")
    assert (tmp_path / "root" / "a" / "%2e%2e" / "%2e%2e" / "x").read_bytes() == b"1"


def test_bad_uri():
    with pytest.raises(StoreError, match="not supported"):
        Store.from_uri("ftp://x/y")
