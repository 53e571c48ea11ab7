AVAILABLE: bool
LANE: int

def copy_crc32c(dst: int, src: int, nbytes: int, crc: int = 0, nontemporal: bool = False, /) -> int: ...
