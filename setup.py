"""Only the optional C extension lives here; everything else is in pyproject.toml.

``lightning_saver.formats._copy_crc`` (copy + CRC-32C in one pass, for verified restores) is optional:
where it cannot be compiled (no compiler, another CPU) the install goes on without it and the
library reads with pread and checksums with google-crc32c instead, the same files, slower.
``lightning_saver.formats._write_regions`` (a sync save's writes and checksums in one call, the
checksums on a second thread) is optional too: without it the save writes with ``os.writev`` and
checksums after each piece, in Python.
``lightning_saver.graph.tf_import._dnnl_conv`` (a float32 convolution through oneDNN's C++ API, its
primitive made once per shape) is built only where oneDNN's header is installed (``libdnnl-dev``;
the Makefile installs it where it can): without it the imported graphs' convolutions run on torch's
kernels only.
"""

import os

from setuptools import Extension, setup

DNNL_HEADER = "/usr/include/dnnl.hpp"
dnnl = [
    Extension(
        "lightning_saver.graph.tf_import._dnnl_conv",
        sources=["lightning_saver/graph/tf_import/_dnnl_conv.cpp"],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17"],
        libraries=["dnnl"],
        optional=True,
    )
] if os.path.exists(DNNL_HEADER) else []

setup(
    ext_modules=[
        Extension(
            "lightning_saver.formats._copy_crc",
            sources=["lightning_saver/formats/_copy_crc.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "lightning_saver.formats._write_regions",
            sources=["lightning_saver/formats/_write_regions.c"],
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        *dnnl,
    ]
)
