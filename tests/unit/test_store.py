import os
import time

from hypergen.api.store import ImageStore


def test_stored_images_are_served_until_they_expire_then_deleted(tmp_path):
    store = ImageStore(tmp_path, ttl_seconds=60, max_bytes=10_000)
    file_id = store.put(b"png-bytes", "png")
    stored = store.get(file_id)
    assert stored is not None and stored.path.read_bytes() == b"png-bytes" and stored.media_type == "image/png"
    past = time.time() - 120
    os.utime(stored.path, (past, past))
    assert store.get(file_id) is None
    assert not stored.path.exists()


def test_ids_are_unguessable_and_paths_cannot_escape(tmp_path):
    store = ImageStore(tmp_path / "images", ttl_seconds=60, max_bytes=10_000)
    (tmp_path / "secret.png").write_bytes(b"secret")
    first, second = store.put(b"a", "png"), store.put(b"b", "webp")
    assert first != second and len(first) > 20 and second.endswith(".webp")
    for probe in ("../secret.png", "..%2Fsecret.png", "secret.png", "img_/../../secret.png", ""):
        assert store.get(probe) is None


def test_the_store_is_bounded_by_bytes_oldest_first(tmp_path):
    store = ImageStore(tmp_path, ttl_seconds=3600, max_bytes=250)
    ids = []
    for index in range(5):
        ids.append(store.put(bytes(100), "png"))
        then = time.time() - 100 + index
        os.utime(tmp_path / ids[-1], (then, then))
    assert store.purge() <= 250
    assert [store.get(file_id) is not None for file_id in ids] == [False, False, False, True, True]


def test_the_cap_holds_between_purges(tmp_path):
    """Writes within one purge interval used to pass the cap until the next purge."""
    store = ImageStore(tmp_path, ttl_seconds=3600, max_bytes=250)
    for _ in range(10):
        store.put(bytes(100), "png")
        on_disk = sum(path.stat().st_size for path in tmp_path.iterdir())
        assert on_disk <= 250


def test_an_edit_without_a_size_keeps_the_uploads_shape_on_the_models_grid():
    from hypergen.api.uploads import default_size

    assert default_size(1000, 750, max_side=1024, min_side=64) == (1000, 752)
    assert default_size(1000, 750, max_side=1024, min_side=64, multiple=16) == (992, 752)  # FLUX.1, SD 3.5: 16
    assert default_size(4000, 3000, max_side=1024, min_side=64, multiple=16) == (1024, 768)
    assert default_size(20, 900, max_side=1000, min_side=64, multiple=16) == (64, 896)  # never below the limits
