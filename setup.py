"""Only the optional C extension lives here; everything else is in pyproject.toml.

``lightning_saver.formats._copy_crc`` (copy + CRC-32C in one pass, for verified restores) is optional:
where it cannot be compiled (no compiler, another CPU) the install goes on without it and the
library reads with pread and checksums with google-crc32c instead, the same files, slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lightning_saver.formats._copy_crc",
            sources=["lightning_saver/formats/_copy_crc.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
