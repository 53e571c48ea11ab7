/* Write many memory regions to a file and checksum each, with the GIL released throughout.
 *
 * A sync save writes ~1,000 tensors straight from their memory. Done from Python, each tensor cost
 * a memoryview, a place in a writev list and a checksum call (~10 us, ~10 ms per 1,000 tensors),
 * and the CRC-32C pass ran on the writing thread after each write (~15 ms per 128 MiB, in series
 * with the writes). Here one call takes the whole list of (address, length) regions: this thread
 * writes them in order with writev, in pieces of at most ``piece`` bytes, while a second thread
 * computes each region's CRC-32C with google-crc32c's ``crc32c_extend`` (its address is passed in:
 * the same hardware CRC the rest of the library uses). Nothing is shared between the two threads
 * but the read-only regions, so they need no synchronisation until the join.
 *
 * With ``writeback`` > 0, every ``writeback`` bytes this thread asks the kernel to start writing
 * the bytes written so far to the disk (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux; it does
 * not wait and makes nothing durable: the caller's fsync still does that), so the disk works while
 * the rest is still being copied instead of only in the final fsync.
 *
 * ``second_thread=False`` checksums each piece on the calling thread right after its write instead
 * (for a caller that must not put work on another core: the async writer at a low priority).
 *
 * The caller keeps every region alive and unchanged until the call returns. Errors: an OSError
 * with the failing call's errno (ENOSPC stays ENOSPC); the CRC thread is always joined first.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

typedef uint32_t (*crc_fn_t)(uint32_t, const uint8_t *, size_t);

typedef struct {
    const uint64_t *regions; /* address, length pairs */
    Py_ssize_t n;
    uint32_t *crcs;
    crc_fn_t crc;
} crc_job;

static void *crc_all(void *arg) {
    crc_job *job = (crc_job *)arg;
    for (Py_ssize_t i = 0; i < job->n; i++) {
        const uint8_t *p = (const uint8_t *)(uintptr_t)job->regions[2 * i];
        size_t len = (size_t)job->regions[2 * i + 1];
        job->crcs[i] = len ? job->crc(0, p, len) : 0;
    }
    return NULL;
}

/* writev everything in iov[0..count), resuming after short writes and EINTR; 0 or an errno */
static int writev_full(int fd, struct iovec *iov, int count) {
    while (count > 0) {
        ssize_t n = writev(fd, iov, count);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        while (count > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0 && n > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

typedef struct {
    const char *p;
    size_t len;
    Py_ssize_t region;
} piece_part;

/* Write all regions in pieces; with ``inline_crc``, checksum each piece right after its write, on
 * this thread, while its bytes are still in this core's cache (no second thread). */
static int write_all_regions(int fd, const uint64_t *regions, Py_ssize_t n, size_t piece,
                             size_t writeback, crc_fn_t inline_crc, uint32_t *crcs,
                             unsigned long long *written) {
    enum { MAX_IOV = IOV_MAX > 1024 ? 1024 : IOV_MAX };
    struct iovec iov[MAX_IOV];
    piece_part parts[MAX_IOV];
    int count = 0;
    size_t gathered = 0, since_flush = 0;
    off_t start = 0, flushed_to = 0;
#ifdef SYNC_FILE_RANGE_WRITE
    if (writeback) {
        start = lseek(fd, 0, SEEK_CUR);
        if (start < 0) writeback = 0; /* not seekable: no write-behind */
        flushed_to = start;
    }
#else
    writeback = 0;
#endif
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *p = (const char *)(uintptr_t)regions[2 * i];
        size_t left = (size_t)regions[2 * i + 1];
        if (inline_crc) crcs[i] = 0;
        while (left > 0 || (i == n - 1 && count > 0)) {
            if (left > 0) {
                size_t take = left < piece - gathered ? left : piece - gathered;
                iov[count].iov_base = (void *)p;
                iov[count].iov_len = take;
                parts[count] = (piece_part){p, take, i};
                count++;
                gathered += take;
                p += take;
                left -= take;
            }
            if (gathered >= piece || count == MAX_IOV || (left == 0 && i == n - 1)) {
                int err = writev_full(fd, iov, count);
                if (err) return err;
                if (inline_crc)
                    for (int k = 0; k < count; k++)
                        crcs[parts[k].region] = inline_crc(crcs[parts[k].region],
                                                           (const uint8_t *)parts[k].p, parts[k].len);
                *written += gathered;
                since_flush += gathered;
                count = 0;
                gathered = 0;
#ifdef SYNC_FILE_RANGE_WRITE
                if (writeback && since_flush >= writeback) {
                    off_t end = start + (off_t)*written;
                    /* a hint: a failure here is not an error of the write (fsync reports real ones) */
                    (void)sync_file_range(fd, flushed_to, end - flushed_to, SYNC_FILE_RANGE_WRITE);
                    flushed_to = end;
                    since_flush = 0;
                }
#endif
            }
        }
    }
    return 0;
}

static PyObject *write_regions(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer regions, crcs;
    unsigned long long crc_address, piece, writeback;
    int second_thread = 1;
    if (!PyArg_ParseTuple(args, "iy*w*KKK|p:write_regions", &fd, &regions, &crcs, &crc_address, &piece,
                          &writeback, &second_thread))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = regions.len / 16;
    if (regions.len % 16 != 0 || crcs.len < n * 4 || piece == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "write_regions: regions must be (address, length) uint64 pairs, crcs room for "
                        "one uint32 per region, piece > 0");
        goto done;
    }
    crc_job job = {(const uint64_t *)regions.buf, n, (uint32_t *)crcs.buf,
                   (crc_fn_t)(uintptr_t)crc_address};
    unsigned long long written = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_t thread;
    int threaded = job.crc != NULL && second_thread && pthread_create(&thread, NULL, crc_all, &job) == 0;
    /* no second thread (not wanted, or none could be started): each piece after its write, here */
    crc_fn_t inline_crc = threaded ? NULL : job.crc;
    err = write_all_regions(fd, job.regions, n, (size_t)piece, (size_t)writeback, inline_crc, job.crcs,
                            &written);
    if (threaded) pthread_join(thread, NULL);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyLong_FromUnsignedLongLong(written);
done:
    PyBuffer_Release(&regions);
    PyBuffer_Release(&crcs);
    return result;
}

static PyMethodDef methods[] = {
    {"write_regions", write_regions, METH_VARARGS,
     "write_regions(fd, regions, crcs, crc_fn, piece, writeback, second_thread=True) -> int\n\n"
     "Write the (address, length) uint64 pairs of ``regions`` to fd in order (writev, at most piece\n"
     "bytes a call) and store each region's CRC-32C in ``crcs`` (uint32s), computed on a second\n"
     "thread by the crc32c_extend function at address ``crc_fn`` (0: no checksums). writeback > 0:\n"
     "start writeback every so many bytes (sync_file_range). second_thread=False: checksum each\n"
     "piece on this thread right after its write. Returns the bytes written."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_write_regions", NULL, -1, methods};

PyMODINIT_FUNC PyInit__write_regions(void) { return PyModule_Create(&module); }
