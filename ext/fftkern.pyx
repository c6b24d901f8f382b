# cython: language_level=3
cimport cython
"""FFT compute kernels: frame -> float32 planes, and spectrum -> power, log-magnitude,
radial profile and peak.

Everything writes into buffers the caller allocated once, runs without the GIL, and
allocates nothing: fresh memory costs about 2.7 us per 4 KiB page on these machines,
more than the arithmetic done here.

Planes are (P, H, W) float32 with P = 1 for gray and P = C for one plane per colour
channel. Spectra are the rfft2 of each plane, (P, H, W//2 + 1) complex64, rows in
standard FFT order (row i is the signed frequency ky = i for i < (H+1)//2, else i - H,
as numpy.fft.fftfreq(H) * H) and columns kx = 0 .. W//2.

Frames from the network are read-only numpy arrays, hence ``const`` memoryviews.
Cython's ``[:, ::1]`` means fully C-contiguous, which received and OpenCV frames are.
"""
from libc.math cimport logf, sqrt, sqrtf
from libc.stdint cimport uint8_t


cdef extern from "bgr_gray.h" nogil:
    void fb_bgr_to_gray_row_u8(const uint8_t *s, float *d, Py_ssize_t cols, float wb,
                               float wg, float wr)

ctypedef fused pixel_t:
    unsigned char
    unsigned short
    float

# ITU-R BT.601 luma weights, the ones cv2.cvtColor(COLOR_BGR2GRAY) uses.
cdef float WB = 0.114
cdef float WG = 0.587
cdef float WR = 0.299


cdef inline Py_ssize_t signed_row_freq(Py_ssize_t i, Py_ssize_t rows) noexcept nogil:
    """numpy.fft.fftfreq convention: the Nyquist row of an even height is negative."""
    return i if i < (rows + 1) // 2 else i - rows


cdef inline bint has_twin(Py_ssize_t kx, Py_ssize_t width) noexcept nogil:
    """True for rfft columns whose mirrored column W - kx was dropped by the rfft.

    Column 0 and, for even W, column W/2 are their own mirror; every other column
    stands for two columns of the full plane.
    """
    return kx > 0 and 2 * kx < width


cdef inline float abs2(float complex z) noexcept nogil:
    return z.real * z.real + z.imag * z.imag


def to_float(const pixel_t[:, ::1] src, float[:, ::1] dst):
    """Copy a 2-D frame into a float32 plane (the gray input of a gray frame)."""
    cdef Py_ssize_t rows = src.shape[0], cols = src.shape[1], y, x
    cdef const pixel_t *s
    cdef float *d
    if dst.shape[0] != rows or dst.shape[1] != cols:
        raise ValueError(f"plane is {dst.shape[0]}x{dst.shape[1]}, frame is {rows}x{cols}")
    with nogil:
        for y in range(rows):
            s = &src[y, 0]
            d = &dst[y, 0]
            for x in range(cols):
                d[x] = <float>s[x]


cdef enum:
    CHUNK = 256  # pixels widened at a time by bgr_to_gray: 3 KiB of stack, stays in L1


def bgr_to_gray(const pixel_t[:, :, ::1] src, float[:, ::1] dst):
    """BGR HxWx3 frame (OpenCV's channel order) -> one float32 luma plane.

    uint8 frames go through ``fb_bgr_to_gray_row_u8`` (ext/bgr_gray.h): SSSE3 byte
    shuffles de-interleave 16 pixels at a time, which GCC will not do by itself for
    stride-3 loads, so it keeps up with cv2.cvtColor and still gives float luma with
    the exact weights. uint16 frames are first widened to float, CHUNK pixels at a
    time, into a stack buffer (GCC vectorises each half of that, not the whole);
    float32 frames take the one-pass loop directly. Every path computes
    (wb * B + wg * G) + wr * R in float, so all give the same bits.
    """
    cdef Py_ssize_t rows = src.shape[0], cols = src.shape[1], y, x, k, x0, n
    cdef const pixel_t *s
    cdef float *d
    cdef float buf[3 * CHUNK]
    # Locals, not the module globals: a store through d could alias a global float,
    # which would force a reload per pixel.
    cdef float wb = WB, wg = WG, wr = WR
    if src.shape[2] != 3:
        raise ValueError(f"gray conversion needs 3 channels (BGR), got {src.shape[2]}")
    if dst.shape[0] != rows or dst.shape[1] != cols:
        raise ValueError(f"plane is {dst.shape[0]}x{dst.shape[1]}, frame is {rows}x{cols}")
    with nogil:
        for y in range(rows):
            s = &src[y, 0, 0]
            d = &dst[y, 0]
            if pixel_t is float:
                for x in range(cols):
                    d[x] = wb * s[3 * x] + wg * s[3 * x + 1] + wr * s[3 * x + 2]
            elif pixel_t is cython.uchar:
                fb_bgr_to_gray_row_u8(<const uint8_t *>s, d, cols, wb, wg, wr)
            else:
                for k in range((cols + CHUNK - 1) // CHUNK):
                    x0 = k * CHUNK
                    n = CHUNK if cols - x0 > CHUNK else cols - x0
                    for x in range(3 * n):
                        buf[x] = <float>s[3 * x0 + x]
                    for x in range(n):
                        d[x0 + x] = wb * buf[3 * x] + wg * buf[3 * x + 1] + wr * buf[3 * x + 2]


def split_channels(const pixel_t[:, :, ::1] src, float[:, :, ::1] dst):
    """HxWxC frame -> (C, H, W) float32 planes, one transform per channel."""
    cdef Py_ssize_t rows = src.shape[0], cols = src.shape[1], chans = src.shape[2]
    cdef Py_ssize_t y, x, c
    cdef const pixel_t *s
    cdef float *d
    if dst.shape[0] != chans or dst.shape[1] != rows or dst.shape[2] != cols:
        raise ValueError(f"planes are {dst.shape[0]}x{dst.shape[1]}x{dst.shape[2]}, "
                         f"frame needs {chans}x{rows}x{cols}")
    with nogil:
        for c in range(chans):
            for y in range(rows):
                s = &src[y, 0, c]
                d = &dst[c, y, 0]
                for x in range(cols):
                    d[x] = <float>s[chans * x]


cdef int check_same(const float complex[:, :, ::1] spec, float[:, :, ::1] out) except -1:
    if (out.shape[0] != spec.shape[0] or out.shape[1] != spec.shape[1]
            or out.shape[2] != spec.shape[2]):
        raise ValueError("output buffer shape differs from the spectrum's")
    return 0


def log_magnitude(const float complex[:, :, ::1] spec, float[:, :, ::1] out):
    """log1p(|X|) of every bin: the usual way to look at a spectrum, finite at |X| = 0.

    Computed as logf(1 + |X|), which glibc runs 4x faster than log1pf here (3.4 vs
    14 ns a bin); the only loss is below |X| ~ 1e-3, and there it is an absolute
    error under 1e-7, far inside what a float32 FFT resolves.
    """
    cdef Py_ssize_t p, i, j
    check_same(spec, out)
    with nogil:
        for p in range(spec.shape[0]):
            for i in range(spec.shape[1]):
                for j in range(spec.shape[2]):
                    out[p, i, j] = logf(1.0 + sqrtf(abs2(spec[p, i, j])))


def radial_bins(Py_ssize_t rows, Py_ssize_t width):
    """Number of radius bins for an HxW frame: floor(sqrt((H//2)^2 + (W//2)^2)) + 1."""
    cdef Py_ssize_t a = rows // 2, b = width // 2
    cdef Py_ssize_t r = <Py_ssize_t>sqrt(<double>(a * a + b * b))
    while (r + 1) * (r + 1) <= a * a + b * b:
        r += 1
    while r * r > a * a + b * b:
        r -= 1
    return r + 1


cdef void accumulate_radial(const float complex *row, Py_ssize_t ky, Py_ssize_t half,
                            Py_ssize_t width, double *acc, bint use_power) noexcept nogil:
    """Add one spectrum row into acc[floor(sqrt(ky^2 + kx^2))], twins weighted 2.

    The radius is stepped with integers (r only grows along a row), so there is no
    sqrt per bin and no floating-point doubt at exact squares. A run of equal radius
    is summed in a register and written once. With ``use_power`` false it adds the
    weights alone, which gives the bin counts.
    """
    cdef Py_ssize_t kx, ky2 = ky * ky
    cdef Py_ssize_t r = ky if ky >= 0 else -ky
    cdef double run = 0.0, v
    for kx in range(half):
        while (r + 1) * (r + 1) <= ky2 + kx * kx:
            acc[r] += run
            run = 0.0
            r += 1
        v = abs2(row[kx]) if use_power else 1.0
        run += 2.0 * v if has_twin(kx, width) else v
    acc[r] += run


def radial_counts(Py_ssize_t rows, Py_ssize_t width, double[::1] counts):
    """Full-plane number of bins at each integer radius (the profile's denominators).

    They sum to rows * width, and none is zero: column 0 reaches every radius up to
    H//2, and along row H//2 consecutive radii differ by less than 1 up to the corner.
    """
    cdef Py_ssize_t i, half = width // 2 + 1
    if counts.shape[0] != radial_bins(rows, width):
        raise ValueError("counts length must be radial_bins(rows, width)")
    with nogil:
        counts[:] = 0.0
        for i in range(rows):
            accumulate_radial(NULL, signed_row_freq(i, rows), half, width, &counts[0], False)


def radial_profile(const float complex[:, :, ::1] spec, Py_ssize_t width,
                   const double[::1] counts, double[::1] acc, float[:, ::1] out):
    """Mean |X|^2 per integer radius floor(sqrt(ky^2 + kx^2)), for each plane.

    Columns with a mirrored twin count twice, so the half-plane gives exactly the mean
    over the full FFT plane. ``acc`` is scratch of the same length as ``counts``.
    """
    cdef Py_ssize_t p, i, b, rows = spec.shape[1], half = spec.shape[2]
    cdef Py_ssize_t nbins = counts.shape[0]
    if half != width // 2 + 1:
        raise ValueError(f"spectrum has {half} columns, a width of {width} gives {width // 2 + 1}")
    if nbins != radial_bins(rows, width) or acc.shape[0] != nbins:
        raise ValueError("counts and acc lengths must be radial_bins(rows, width)")
    if out.shape[0] != spec.shape[0] or out.shape[1] != nbins:
        raise ValueError("profile buffer must be (planes, radial_bins(rows, width))")
    with nogil:
        for p in range(spec.shape[0]):
            acc[:] = 0.0
            for i in range(rows):
                accumulate_radial(&spec[p, i, 0], signed_row_freq(i, rows), half, width,
                                  &acc[0], True)
            for b in range(nbins):
                out[p, b] = <float>(acc[b] / counts[b])


cdef inline float sq(const float *f, Py_ssize_t j) noexcept nogil:
    """|X|^2 of complex element j of an interleaved float array (one formula for the
    max and for finding where it is, so they agree to the last bit)."""
    return f[2 * j] * f[2 * j] + f[2 * j + 1] * f[2 * j + 1]


cdef inline float row_max_abs2(const float *f, Py_ssize_t n) noexcept nogil:
    """max |X|^2 over a row, with four independent maxima so the CPU can overlap them
    (a single running max is one long dependency chain)."""
    cdef float m0 = -1.0, m1 = -1.0, m2 = -1.0, m3 = -1.0, v0, v1, v2, v3
    cdef Py_ssize_t j = 0
    while j + 4 <= n:
        v0 = sq(f, j)
        v1 = sq(f, j + 1)
        v2 = sq(f, j + 2)
        v3 = sq(f, j + 3)
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        j += 4
    while j < n:
        v0 = sq(f, j)
        m0 = v0 if v0 > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


def peak(const float complex[:, :, ::1] spec, Py_ssize_t width, float[:, ::1] out):
    """[ky, kx, |X|] of the largest bin other than DC, for each plane.

    Each full-plane peak appears twice (X and its conjugate mirror); the answer is
    the representative in the rfft half-plane, kx >= 0, and on the self-mirrored
    columns (kx = 0 and, for even W, kx = W/2) the one with row index <= H//2, i.e.
    ky >= 0 except the even-height Nyquist row ky = -H/2. Exact ties go to the
    first bin in row-major order. Compares |X|^2 and takes one sqrt at the end.
    """
    cdef Py_ssize_t p, i, j, j0, j1, rows = spec.shape[1], half = spec.shape[2]
    cdef Py_ssize_t best_i, best_j
    cdef float best, v
    cdef const float *row
    if half != width // 2 + 1:
        raise ValueError(f"spectrum has {half} columns, a width of {width} gives {width // 2 + 1}")
    if rows * width < 2:
        raise ValueError("a 1x1 frame has nothing but DC")
    if out.shape[0] != spec.shape[0] or out.shape[1] != 3:
        raise ValueError("peak buffer must be (planes, 3)")
    with nogil:
        for p in range(spec.shape[0]):
            best = -1.0
            best_i = 0
            best_j = 0
            for i in range(rows):
                j0 = 1 if i == 0 or i > rows // 2 else 0
                j1 = half - 1 if i > rows // 2 and width % 2 == 0 else half
                if j1 <= j0:
                    continue
                row = <const float *>&spec[p, i, j0]
                v = row_max_abs2(row, j1 - j0)
                if v > best:  # rare after the first rows: only then look for where
                    best = v
                    best_i = i
                    for j in range(j1 - j0):
                        if sq(row, j) == v:
                            best_j = j0 + j
                            break
            out[p, 0] = <float>signed_row_freq(best_i, rows)
            out[p, 1] = <float>best_j
            out[p, 2] = sqrtf(best)
