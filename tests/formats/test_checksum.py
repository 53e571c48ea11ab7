import google_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_saver.formats import checksum


@settings(max_examples=10, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4 << 20))
def test_combine_over_megabytes_matches_google_crc32c(a, n):
    b = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert checksum.combine(google_crc32c.value(a), google_crc32c.value(b), n) == google_crc32c.value(a + b)


def test_combine_of_three_parts_is_associative_like_the_bytes():
    a, b, c = b"lightning", b"_saver" * 1000, bytes(range(256)) * 33
    ab = checksum.combine(google_crc32c.value(a), google_crc32c.value(b), len(b))
    abc = checksum.combine(ab, google_crc32c.value(c), len(c))
    assert abc == google_crc32c.value(a + b + c)
