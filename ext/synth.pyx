# cython: language_level=3
"""Synthetic camera frames: render into a caller's buffer, and verify what arrived.

A frame is a deterministic function of its frame id, so any receiver can check that
a whole frame arrived intact and is the frame its header claims. The scene is a
precomputed texture (gradient plus fixed-pattern noise) with a bright disc moving on
a circle, and the frame id stamped into the first 16 bytes. Rendering into a buffer
that holds an older synthetic frame only repaints the old and new disc and the
stamp, so the source costs microseconds even at 2048x2048 and never allocates.

Frames are viewed as (rows, cols, channels): 1-D is (1, N, 1), 2-D is (H, W, 1),
3-D is (H, W, C), 4-D folds the leading axis into rows.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int8_t, int16_t, int32_t, int64_t
from libc.string cimport memcmp, memcpy
from libc.math cimport sin, cos, sqrt

ctypedef fused pixel_t:
    uint8_t
    uint16_t
    uint32_t
    uint64_t
    int8_t
    int16_t
    int32_t
    int64_t
    float
    double

cdef uint64_t STAMP_KEY = 0x9E3779B97F4A7C15ULL


cdef inline void disc(uint64_t frame_id, Py_ssize_t rows, Py_ssize_t cols,
                      Py_ssize_t *cy, Py_ssize_t *cx, Py_ssize_t *r) noexcept nogil:
    """Centre and radius of the moving disc for this frame."""
    cdef double a = <double>(frame_id % 360) * 0.017453292519943295
    cdef Py_ssize_t m = rows if rows < cols else cols
    r[0] = m // 10
    cy[0] = rows // 2 + <Py_ssize_t>(0.3 * rows * sin(a))
    cx[0] = cols // 2 + <Py_ssize_t>(0.3 * cols * cos(a))


cdef inline void stamp_bytes(uint8_t *dst, Py_ssize_t nbytes, uint64_t frame_id) noexcept nogil:
    """Frame id (u64 LE) then frame id XOR a key, truncated to the frame size."""
    cdef uint64_t words[2]
    words[0] = frame_id
    words[1] = frame_id ^ STAMP_KEY
    memcpy(dst, <uint8_t*>words, nbytes if nbytes < 16 else 16)


cdef inline void disc_box(uint64_t frame_id, Py_ssize_t rows, Py_ssize_t cols,
                         Py_ssize_t *y0, Py_ssize_t *y1, Py_ssize_t *x0,
                         Py_ssize_t *x1) noexcept nogil:
    """Bounding box (inclusive, clipped to the frame) of the disc of ``frame_id``."""
    cdef Py_ssize_t cy, cx, r
    disc(frame_id, rows, cols, &cy, &cx, &r)
    y0[0] = cy - r if cy - r > 0 else 0
    y1[0] = cy + r if cy + r < rows - 1 else rows - 1
    x0[0] = cx - r if cx - r > 0 else 0
    x1[0] = cx + r if cx + r < cols - 1 else cols - 1


cdef inline Py_ssize_t disc_half_width(Py_ssize_t r, Py_ssize_t dy) noexcept nogil:
    """Largest h with h*h + dy*dy <= r*r (the disc's half span on one row), or -1."""
    cdef Py_ssize_t v = r * r - dy * dy
    cdef Py_ssize_t h
    if v < 0:
        return -1
    h = <Py_ssize_t>sqrt(<double>v)
    while (h + 1) * (h + 1) <= v:
        h += 1
    while h * h > v:
        h -= 1
    return h


def render(pixel_t[::1] out, const pixel_t[::1] texture, uint64_t frame_id, long long prev_id,
           Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t chans, pixel_t bright):
    """Write frame ``frame_id`` into ``out`` (flat view of the frame buffer).

    ``prev_id`` is the synthetic frame ``out`` holds now, or -1 if unknown: then the
    whole texture is copied, else only the previous disc and the stamp are restored.
    """
    cdef Py_ssize_t n = rows * cols * chans
    cdef Py_ssize_t y, c, cy, cx, r, h, y0, y1, x0, x1, base
    if out.shape[0] != n or texture.shape[0] != n:
        raise ValueError("buffer or texture size does not match the frame geometry")
    with nogil:
        if prev_id < 0:
            memcpy(&out[0], &texture[0], n * sizeof(pixel_t))
        else:
            disc_box(<uint64_t>prev_id, rows, cols, &y0, &y1, &x0, &x1)
            for y in range(y0, y1 + 1):
                base = (y * cols + x0) * chans
                memcpy(&out[base], &texture[base], (x1 - x0 + 1) * chans * sizeof(pixel_t))
            memcpy(&out[0], &texture[0], (n * sizeof(pixel_t) if n * sizeof(pixel_t) < 16 else 16))
        disc(frame_id, rows, cols, &cy, &cx, &r)
        for y in range(cy - r if cy - r > 0 else 0, (cy + r if cy + r < rows - 1 else rows - 1) + 1):
            h = disc_half_width(r, y - cy)
            x0 = cx - h if cx - h > 0 else 0
            x1 = cx + h if cx + h < cols - 1 else cols - 1
            base = (y * cols + x0) * chans
            for c in range((x1 - x0 + 1) * chans if x1 >= x0 else 0):
                out[base + c] = bright
        stamp_bytes(<uint8_t*>&out[0], n * sizeof(pixel_t), frame_id)


cdef inline Py_ssize_t first_diff(const pixel_t *a, const pixel_t *b, Py_ssize_t start,
                                  Py_ssize_t stop) noexcept nogil:
    """First index in [start, stop) where the bytes of a and b differ, or -1.

    memcmp runs at memory speed; the element loop only runs to locate a mismatch.
    """
    cdef Py_ssize_t j
    if stop <= start or memcmp(&a[start], &b[start], (stop - start) * sizeof(pixel_t)) == 0:
        return -1
    for j in range(start, stop):
        if memcmp(&a[j], &b[j], sizeof(pixel_t)) != 0:
            return j
    return -1


cdef inline Py_ssize_t first_not(const pixel_t *a, pixel_t v, Py_ssize_t start,
                                 Py_ssize_t stop) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(start, stop):
        if a[j] != v:
            return j
    return -1


def verify(const pixel_t[::1] frame, const pixel_t[::1] texture, uint64_t frame_id,
           Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t chans, pixel_t bright):
    """Flat index of the first element that differs from frame ``frame_id``, or -1.

    Compares row by row against what ``render`` writes (texture outside the disc,
    ``bright`` inside, the stamp first), without building the expected frame.
    """
    cdef Py_ssize_t n = rows * cols * chans
    cdef Py_ssize_t row_len = cols * chans
    cdef Py_ssize_t y, cy, cx, r, h, xa, xb, row0, a, b, stamp_elems, i
    cdef Py_ssize_t bad = -1
    cdef const pixel_t *f
    cdef const pixel_t *t
    cdef pixel_t stamp_buf[16]
    if frame.shape[0] != n or texture.shape[0] != n:
        return 0
    with nogil:
        disc(frame_id, rows, cols, &cy, &cx, &r)
        f = &frame[0]
        t = &texture[0]
        stamp_elems = (16 + sizeof(pixel_t) - 1) // sizeof(pixel_t)
        if stamp_elems > n:
            stamp_elems = n
        for i in range(stamp_elems):
            stamp_buf[i] = t[i]
        for y in range(rows):
            row0 = y * row_len
            h = disc_half_width(r, y - cy) if 0 <= y - (cy - r) and y <= cy + r else -1
            xa = cx - h if cx - h > 0 else 0
            xb = cx + h if cx + h < cols - 1 else cols - 1
            if h < 0 or xa > xb:
                bad = first_diff(f, t, max(row0, stamp_elems), row0 + row_len)
            else:
                a = row0 + xa * chans
                b = row0 + (xb + 1) * chans
                for i in range(a, min(b, stamp_elems)):
                    stamp_buf[i] = bright
                bad = first_diff(f, t, max(row0, stamp_elems), max(a, stamp_elems))
                if bad < 0:
                    bad = first_not(f, bright, max(a, stamp_elems), max(b, stamp_elems))
                if bad < 0:
                    bad = first_diff(f, t, max(b, stamp_elems), row0 + row_len)
            if bad >= 0:
                break
        if bad < 0:
            stamp_bytes(<uint8_t*>stamp_buf, n * sizeof(pixel_t) if n * sizeof(pixel_t) < 16 else 16,
                        frame_id)
            bad = first_diff(f, <const pixel_t*>stamp_buf, 0, stamp_elems)
    return bad


def read_stamp(const uint8_t[::1] raw):
    """Frame id stamped in the first 16 bytes, or -1 if the stamp is damaged or absent."""
    cdef uint64_t words[2]
    if raw.shape[0] < 16:
        return -1
    memcpy(<uint8_t*>words, &raw[0], 16)
    if words[1] != (words[0] ^ STAMP_KEY):
        return -1
    return words[0]
