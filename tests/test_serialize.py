"""Out-of-band pickling of large results: round trips, writable views."""

import pytest

from shoal import _serialize

np = pytest.importorskip("numpy")


@pytest.mark.parametrize(
    "obj",
    [
        np.arange(100_000.0),
        np.arange(100_000.0)[::3],  # not contiguous: pickled in band
        np.ones((300, 300), order="F"),
        np.zeros(0),
        np.arange(12, dtype=np.int16).reshape(3, 4),
    ],
)
def test_large_arrays_round_trip_writable(obj):
    data = _serialize.dumps_large(obj)
    back = _serialize.loads(bytearray(data))
    np.testing.assert_array_equal(back, obj)
    assert back.dtype == obj.dtype and back.flags.writeable
    back[...] = 0  # a view of the received buffer, which it may write


def test_buffers_are_aligned_views_of_the_received_data():
    data = bytearray(_serialize.dumps_large(np.arange(1000.0)))
    back = _serialize.loads(data)
    base = np.frombuffer(data, dtype=np.uint8)
    offset = back.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    assert 0 < offset < len(data) and offset % 64 == 0
    back[0] = 42.0
    assert np.frombuffer(data, dtype=np.float64, count=1, offset=offset)[0] == 42.0


def test_plain_pickles_still_load():
    assert _serialize.loads(_serialize.dumps({"a": [1, 2]})) == {"a": [1, 2]}


def test_a_frame_can_place_its_one_buffer_at_any_offset():
    a = np.arange(1000.0)
    parts, _, oob = _serialize.frame_parts(a)
    head, raw = _serialize.in_place_head(parts, 4096 + 8)
    assert oob and len(head) < 4096
    data = bytearray(4096 + 8 + raw.nbytes)
    data[: len(head)] = head
    data[4096 + 8 :] = raw
    back = _serialize.loads(data)
    np.testing.assert_array_equal(back, a)
    # Frames of several buffers, or none, have no such form.
    two, _, _ = _serialize.frame_parts((a, a + 1))
    assert _serialize.in_place_head(two, 4096) is None
    assert _serialize.in_place_head(_serialize.frame_parts([1, 2])[0], 4096) is None
