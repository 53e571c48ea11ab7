from typing_extensions import Buffer

def write_regions(
    fd: int, regions: Buffer, crcs: Buffer, crc_fn: int, piece: int, writeback: int,
    second_thread: bool = True, /,
) -> int: ...
