"""How records are stored (queues/codec.py): arrays packed with their shape and dtype, in a zlib stream
that any zlib reads."""


def test_array_packing_roundtrips_shapes_and_dtypes_and_refuses_others():
    import numpy as np
    import pytest

    from oodguard.queues.base import QueueError
    from oodguard.queues.codec import pack_array, unpack_array

    arrays = [np.random.default_rng(0).random((1, 28, 28), dtype=np.float32), np.arange(5, dtype=np.int64),
              np.zeros((0, 3), np.uint8), np.array(2.5), np.arange(12, dtype=">f4").reshape(3, 4).T]
    for array in arrays:
        back = unpack_array(pack_array(array))
        assert back.shape == array.shape and np.array_equal(back, array)
    with pytest.raises(QueueError, match="complex"):
        pack_array(np.zeros(2, np.complex64))


def test_stored_zlib_is_what_zlib_writes_at_level_0_and_any_zlib_reads():
    import zlib

    import numpy as np

    from oodguard.queues.codec import STORED_BLOCK, stored_zlib, unpack_array

    rng = np.random.default_rng(1)
    for size in (0, 1, 3148, 60_000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert stored_zlib(data) == zlib.compress(data, 0)  # byte for byte at a record's sizes
    for size in (STORED_BLOCK - 1, STORED_BLOCK, STORED_BLOCK + 1, 3 * STORED_BLOCK, 200_000):  # several blocks: the last one marked final
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        blob = stored_zlib(data)
        assert zlib.decompress(blob) == data and len(blob) == size + 6 + 5 * -(-size // STORED_BLOCK)
    # rows an older gateway deflated (level 6) still unpack
    header = bytes([0, 2]) + np.array([2, 3], "<u4").tobytes()
    values = np.arange(6, dtype="<f4")
    old = zlib.compress(header + values.tobytes(), 6)
    assert np.array_equal(unpack_array(old), values.reshape(2, 3))
