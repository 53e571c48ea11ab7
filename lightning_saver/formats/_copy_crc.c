/* Copy bytes and compute their CRC-32C in one pass over the memory.
 *
 * A verified restore has to move every tensor byte from the file's pages into the tensor and checksum
 * it. Done as two steps (read, then checksum the copy) that is two trips through the core; done here
 * it is one: each 8-byte word is loaded once, fed to the CPU's crc32 instruction and stored. Three
 * lanes, each a third of a 24 KiB block, run side by side so that the instruction's 3-cycle latency
 * is hidden; the lanes are joined by shifting a lane's CRC over the bytes of the next (a table per
 * register byte, built at import from the instruction itself). With ``nontemporal`` the stores
 * bypass the cache (movnti): for copies far larger than the cache this saves reading every
 * destination line before it is overwritten.
 *
 * The CRC arguments follow google-crc32c's ``crc32c_extend``: ``crc`` is a finished CRC-32C (0 to
 * start), the result is the finished CRC-32C of everything so far.
 *
 * Built only on x86-64 with GCC or Clang, and used only where the CPU has SSE4.2 (``AVAILABLE``);
 * elsewhere the module still imports, with ``AVAILABLE`` false, and lightning_saver reads with
 * pread and checksums with google-crc32c instead.
 *
 * ``crc32c`` is the same pass without the copy: the read alone (about half the time of
 * google-crc32c's ``crc32c_extend`` here, 2 vCPUs of a Xeon 6 with AVX-512, 2026-12-06).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define LS_X86 1
#include <immintrin.h>
#endif

#define LANE 8192 /* bytes per lane; a block is three lanes */

#ifdef LS_X86
static uint32_t lane_shift[4][256]; /* entry [k][b]: raw register (b << 8k) after LANE zero bytes */
static int cpu_ok;

__attribute__((target("sse4.2"))) static uint32_t after_zeros(uint32_t raw, size_t nbytes) {
    uint64_t r = raw;
    for (size_t i = 0; i < nbytes / 8; i++) r = _mm_crc32_u64(r, 0);
    return (uint32_t)r;
}

__attribute__((target("sse4.2"))) static void build_tables(void) {
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) lane_shift[k][b] = after_zeros(b << (8 * k), LANE);
}

/* The register is linear in its start value: shift each byte by its own table and add (xor). */
static inline uint32_t shift_lane(uint32_t c) {
    return lane_shift[0][c & 255] ^ lane_shift[1][(c >> 8) & 255] ^ lane_shift[2][(c >> 16) & 255] ^
           lane_shift[3][c >> 24];
}

static inline void store(uint8_t *dst, uint64_t word, int nt) {
    if (nt)
        _mm_stream_si64((long long *)dst, (long long)word);
    else
        memcpy(dst, &word, 8);
}

static inline uint64_t load(const uint8_t *src) {
    uint64_t word;
    memcpy(&word, src, 8);
    return word;
}

/* raw: the CRC register (not inverted); returns the register after the n bytes. Without ``copy``
 * only the CRC (dst unused): inlined with a constant ``copy``, each caller gets its own loop. */
__attribute__((target("sse4.2"), always_inline)) static inline uint32_t crc_pass(
    uint8_t *dst, const uint8_t *src, size_t n, uint32_t raw, int nt, int copy) {
    uint64_t c0 = raw;
    while (n >= 3 * LANE) {
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t a = load(src + i), b = load(src + LANE + i), c = load(src + 2 * LANE + i);
            c0 = _mm_crc32_u64(c0, a);
            c1 = _mm_crc32_u64(c1, b);
            c2 = _mm_crc32_u64(c2, c);
            if (copy) {
                store(dst + i, a, nt);
                store(dst + LANE + i, b, nt);
                store(dst + 2 * LANE + i, c, nt);
            }
        }
        /* register(A B C) = shift(shift(reg(A)) ^ reg0(B)) ^ reg0(C), each lane LANE bytes */
        c0 = shift_lane(shift_lane((uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
        src += 3 * LANE;
        if (copy) dst += 3 * LANE;
        n -= 3 * LANE;
    }
    for (; n >= 8; n -= 8, src += 8) {
        uint64_t a = load(src);
        c0 = _mm_crc32_u64(c0, a);
        if (copy) {
            memcpy(dst, &a, 8);
            dst += 8;
        }
    }
    uint32_t c = (uint32_t)c0;
    for (; n > 0; n--, src++) {
        c = _mm_crc32_u8(c, *src);
        if (copy) *dst++ = *src;
    }
    if (copy && nt) _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
    return c;
}

__attribute__((target("sse4.2"))) static uint32_t copy_crc_raw(uint8_t *dst, const uint8_t *src,
                                                                size_t n, uint32_t raw, int nt) {
    return crc_pass(dst, src, n, raw, nt, 1);
}

__attribute__((target("sse4.2"))) static uint32_t crc_raw(const uint8_t *src, size_t n, uint32_t raw) {
    return crc_pass(NULL, src, n, raw, 0, 0);
}
#endif

static PyObject *copy_crc32c(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t nbytes;
    unsigned int crc = 0;
    int nontemporal = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKn|Ip:copy_crc32c", &dst, &src, &nbytes, &crc, &nontemporal))
        return NULL;
    if (nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "copy_crc32c: nbytes must be >= 0, found %zd", nbytes);
        return NULL;
    }
#ifdef LS_X86
    if (!cpu_ok) {
        PyErr_SetString(PyExc_RuntimeError, "copy_crc32c: this CPU has no SSE4.2 crc32 instruction");
        return NULL;
    }
    uint32_t raw = ~(uint32_t)crc;
    Py_BEGIN_ALLOW_THREADS
    raw = copy_crc_raw((uint8_t *)(uintptr_t)dst, (const uint8_t *)(uintptr_t)src, (size_t)nbytes, raw,
                       nontemporal);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong((unsigned long)(~raw));
#else
    (void)dst;
    (void)src;
    (void)crc;
    (void)nontemporal;
    PyErr_SetString(PyExc_RuntimeError, "copy_crc32c: built without x86-64 crc32 support");
    return NULL;
#endif
}

static PyObject *crc32c(PyObject *self, PyObject *args) {
    unsigned long long src;
    Py_ssize_t nbytes;
    unsigned int crc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kn|I:crc32c", &src, &nbytes, &crc)) return NULL;
    if (nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "crc32c: nbytes must be >= 0, found %zd", nbytes);
        return NULL;
    }
#ifdef LS_X86
    if (!cpu_ok) {
        PyErr_SetString(PyExc_RuntimeError, "crc32c: this CPU has no SSE4.2 crc32 instruction");
        return NULL;
    }
    uint32_t raw = ~(uint32_t)crc;
    Py_BEGIN_ALLOW_THREADS
    raw = crc_raw((const uint8_t *)(uintptr_t)src, (size_t)nbytes, raw);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong((unsigned long)(~raw));
#else
    (void)src;
    (void)crc;
    PyErr_SetString(PyExc_RuntimeError, "crc32c: built without x86-64 crc32 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"crc32c", crc32c, METH_VARARGS,
     "crc32c(src, nbytes, crc=0) -> int\n\n"
     "crc extended with nbytes at address src (CRC-32C, as google_crc32c.extend): copy_crc32c's\n"
     "pass without the copy. The caller keeps the region alive."},
    {"copy_crc32c", copy_crc32c, METH_VARARGS,
     "copy_crc32c(dst, src, nbytes, crc=0, nontemporal=False) -> int\n\n"
     "Copy nbytes from address src to address dst and return crc extended with those bytes\n"
     "(CRC-32C, as google_crc32c.extend). The caller keeps both regions alive and disjoint."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copy_crc", NULL, -1, methods};

PyMODINIT_FUNC PyInit__copy_crc(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    int available = 0;
#ifdef LS_X86
    __builtin_cpu_init();
    cpu_ok = __builtin_cpu_supports("sse4.2");
    if (cpu_ok) build_tables();
    available = cpu_ok;
#endif
    if (PyModule_AddObject(m, "AVAILABLE", PyBool_FromLong(available)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
