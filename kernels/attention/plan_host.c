/* plan_host.c: the page-table work of the attention wrappers' plan() in one call, on the host.
 *
 * # B = batch, P = page_size, W = work items (decode), T = query tiles (prefill)
 *
 * Plain C99, no Python or CUDA headers: moecomm/jit/host.py compiles it with the system C compiler
 * (cc -O3 -std=c99 -shared -fPIC) and moecomm/attention/_plan_host.py calls it through ctypes.
 *
 * Why: plan() has <= 30 us of host time for B <= 128 (issue 15). Its numpy version costs ~20-45 us,
 * not in arithmetic but in the count of numpy / Python operations (~0.3-1 us each): ~40 of them.
 * Here one call checks the page table (check_page_table, check_indices of _common.py), computes the
 * lengths, the split-KV chunking (decode) or the query tiles (prefill), and writes every section of
 * the pinned staging buffer; the Python around it passes raw addresses and reads a few results.
 *
 * The contract with the numpy path (decode.py / prefill.py), which stays the reference:
 * - PLAN_OK: the staging buffer holds exactly the ints the numpy path writes (same sections, same
 *   offsets; nothing else written), and args[O_*] hold what the numpy path computes besides.
 * - Any other status: nothing was written to the staging buffer, and plan() runs its numpy path,
 *   which raises its error (the messages live there, once) or, for PLAN_UNSUPPORTED, plans: values
 *   this file does not reproduce bit for bit (where numpy's int32 arithmetic would wrap, or raise
 *   OverflowError) are left to numpy, not guessed.
 * - Every check runs before the first write, and every write is inside [0, need) with need <=
 *   staging_size checked first: the C path never writes outside the buffer the caller sized.
 *
 * Integers: the tables come as int32 or int64 (any mix, flags F_*64). Arithmetic is in int64 on
 * values checked to be in range first, so nothing here overflows; a KV length, indptr or id that
 * does not fit the int32 staging buffer is PLAN_UNSUPPORTED.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The loops over the page ids (16-32K of them at the shapes) are the only ones long enough
 * to matter: vectorised (-O3), their unsigned max needs SSE4.1 / AVX2 (x86-64's baseline, SSE2,
 * has no such instruction: ~25 us scalar for 32K int32 ids here, ~1.5 us with AVX2). Built for
 * the baseline so that one cached library runs on any x86-64 host, they carry an AVX2 clone that
 * glibc's loader picks where the CPU has it (GCC >= 6, clang >= 14 on Linux; elsewhere one version). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

#define PLAN_VERSION 2 /* moecomm/attention/_plan_host.py checks it: bump both with the args layout */

enum {
    PLAN_OK = 0,
    PLAN_INVALID = 1,     /* a check failed: the numpy path raises the error */
    PLAN_UNSUPPORTED = 2, /* values outside what this file reproduces exactly: the numpy path plans */
    PLAN_NEED_ROOM = 3,   /* args[O_NEED] (O_P_NEED) ints are needed; nothing written */
    PLAN_NO_MEMORY = 4    /* malloc failed (the causal tile sort's scratch) */
};

/* flags, per call */
#define F_INDPTR64 1     /* indptr (decode) / paged_kv_indptr (prefill) is int64, else int32 */
#define F_LAST64 2       /* last_page_len is int64 */
#define F_IDS64 4        /* the page ids are int64 */
#define F_HOST_IDS 8     /* the page ids are on the host (range-checked; copied unless graph mode) */
#define F_QO64 16        /* prefill: qo_indptr is int64 */
#define F_CAUSAL 32      /* prefill: causal tiles, heaviest first */
#define F_CONSECUTIVE 64 /* prefill: report whether each request's page ids are consecutive */

/* The one argument, args[NUM_ARGS] (int64; addresses as integers): a ctypes call costs ~0.4 us plus
 * ~0.07 us per argument, so the Python side writes a call's inputs into this block (one slice
 * assignment) and passes its address alone. [0, 16): this call's tables and staging buffer;
 * [16, 32): the wrapper's configuration, set when it changes; [32, 40): the results. */
enum {
    /* per call */
    A_INDPTR = 0, A_N_INDPTR, A_LAST, A_N_LAST, A_IDS, A_N_IDS, A_FLAGS, A_NUM_PAGES, A_STAGING, A_STAGING_SIZE,
    A_QO, A_N_QO, /* prefill */
    /* decode configuration */
    D_PAGE = 16, D_WINDOW, D_BLOCK_N, D_TARGET, D_SPLIT_BELOW, D_KV_HEADS, D_DISABLE_SPLIT, D_CHUNK, D_GRAPH,
    D_MAX_BATCH, D_MAX_WORK, D_LAYOUT_WORK, D_IDS_CAP, D_ALIGN, D_MIN_CHUNK,
    /* prefill configuration */
    P_PAGE = 16, P_BLOCK_M, P_GRAPH, P_MAX_BATCH, P_MAX_TOKENS, P_TILE_CAP, P_IDS_CAP, P_ALIGN, P_MAX_TILES,
    /* results: decode */
    O_NUM_WORK = 32, O_SPLIT, O_MAX_INDEX, O_NEED,
    /* results: prefill */
    O_NUM_TILES = 32, O_P_MAX_INDEX, O_CONSECUTIVE, O_P_NEED, O_NNZ
};

#define I32_MAX INT64_C(2147483647)

static inline int64_t at(const void *p, int is64, int64_t i) {
    return is64 ? ((const int64_t *)p)[i] : (int64_t)((const int32_t *)p)[i];
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; } /* x >= 0, m > 0 */

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; } /* a >= 0, b > 0 */

/* The KV length of request b of a table already checked by check_table (0 without pages). */
static inline int64_t kv_len(const void *indptr, int ip64, const void *last, int l64, int64_t page_size, int64_t b) {
    int64_t pages = at(indptr, ip64, b + 1) - at(indptr, ip64, b);
    return pages > 0 ? (pages - 1) * page_size + at(last, l64, b) : 0;
}

/* check_page_table of _common.py: batch >= 0, one last_page_len per request, indptr[0] == 0,
 * non-decreasing, last_page_len in [1, P] for a request with pages, indptr[-1] <= num_indices. Sets
 * *full (every request has pages) and *sum_span (the sum of min(length, window) over requests,
 * window < 0: none). Unsupported: a length or indptr[-1] past int32. */
static int check_table(const void *indptr, int64_t n_indptr, int ip64, const void *last, int64_t n_last, int l64,
                       int64_t num_indices, int64_t page_size, int64_t window, int *full, int64_t *sum_span) {
    int64_t batch = n_indptr - 1, prev, b, sum = 0;
    int all = 1;
    if (batch < 0 || n_last != batch || at(indptr, ip64, 0) != 0)
        return PLAN_INVALID;
    prev = 0;
    for (b = 0; b < batch; b++) {
        int64_t next = at(indptr, ip64, b + 1), pages, len = 0;
        if (next < prev)
            return PLAN_INVALID;
        pages = next - prev; /* prev >= 0 (indptr[0] == 0, non-decreasing): no overflow */
        if (pages > 0) {
            int64_t l = at(last, l64, b);
            if (l < 1 || l > page_size)
                return PLAN_INVALID;
            if (pages - 1 > (I32_MAX - l) / page_size)
                return PLAN_UNSUPPORTED; /* the length needs more than int32 (numpy's int32 table wraps) */
            len = (pages - 1) * page_size + l;
        } else {
            all = 0;
        }
        sum += (window >= 0 && len > window) ? window : len;
        prev = next;
    }
    if (prev > num_indices)
        return PLAN_INVALID;
    if (prev > I32_MAX)
        return PLAN_UNSUPPORTED;
    *full = all;
    *sum_span = sum;
    return PLAN_OK;
}

VECTOR_CLONES static uint32_t max_u32(const uint32_t *p, int64_t n) {
    uint32_t hi = 0;
    int64_t i;
    for (i = 0; i < n; i++)
        hi = p[i] > hi ? p[i] : hi;
    return hi;
}

/* (the bitwise or of the int64 ids, the max of their low 32 bits): the or is < 2**31 iff every id
 * is in [0, 2**31), and then the low words are the ids (64-bit unsigned max needs AVX-512). */
VECTOR_CLONES static uint32_t or_max_u64(const uint64_t *p, int64_t n, uint64_t *bits) {
    uint64_t any = 0;
    uint32_t hi = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        const uint32_t low = (uint32_t)p[i];
        any |= p[i];
        hi = low > hi ? low : hi;
    }
    *bits = any;
    return hi;
}

VECTOR_CLONES static void narrow(int32_t *restrict dst, const int64_t *restrict src, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++)
        dst[i] = (int32_t)src[i]; /* values checked to fit */
}

/* check_indices of _common.py: every id in [0, 2**31) and < num_pages (num_pages < 0: not given);
 * *max_index = the largest (-1 for none). One pass (two for int64). */
static int check_ids(const void *ids, int64_t n, int is64, int64_t num_pages, int64_t *max_index) {
    uint64_t hi;
    if (n == 0) {
        *max_index = -1;
        return PLAN_OK;
    }
    if (is64) {
        uint64_t bits;
        hi = or_max_u64((const uint64_t *)ids, n, &bits);
        if (bits >= (UINT64_C(1) << 31))
            return PLAN_INVALID;
    } else {
        hi = max_u32((const uint32_t *)ids, n); /* a negative id shows as >= 2**31 */
    }
    if (hi >= (UINT64_C(1) << 31) || (num_pages >= 0 && (int64_t)hi >= num_pages))
        return PLAN_INVALID;
    *max_index = (int64_t)hi;
    return PLAN_OK;
}

static void copy_ints(int32_t *dst, const void *src, int is64, int64_t n) {
    if (is64)
        narrow(dst, (const int64_t *)src, n);
    else if (n > 0)
        memcpy(dst, src, (size_t)n * sizeof(int32_t));
}

int moecomm_plan_version(void) { return PLAN_VERSION; }

/* ------------------------------------------------------------------------------------------ decode */

/* BatchDecodeWithPagedKVCacheWrapper.plan()'s host work (decode.py: its numpy path is the reference).
 *
 * args: A_INDPTR [A_N_INDPTR], A_LAST [A_N_LAST]: the page table; A_IDS [A_N_IDS]: the page ids (read
 * only with F_HOST_IDS; A_N_IDS counts them either way); A_NUM_PAGES: the cache's page count (< 0:
 * not given); A_STAGING [A_STAGING_SIZE]: the staging buffer (int32); D_*: the configuration;
 * results O_* (O_NEED also with PLAN_NEED_ROOM).
 *
 * Staging layout (decode.py _make_layout): h[0] = W, then work_req [W] at D_ALIGN, then per request
 * chunk (unused here), work_indptr [B + 1], kv_indptr [B + 1], kv_len [B], then the host ids. */
int moecomm_decode_plan(int64_t *args) {
    const void *indptr = (const void *)(intptr_t)args[A_INDPTR], *last = (const void *)(intptr_t)args[A_LAST];
    const void *ids = (const void *)(intptr_t)args[A_IDS];
    const int64_t n_indptr = args[A_N_INDPTR], n_last = args[A_N_LAST], n_ids = args[A_N_IDS];
    const int64_t flags = args[A_FLAGS], num_pages = args[A_NUM_PAGES], h_size = args[A_STAGING_SIZE];
    int32_t *h = (int32_t *)(intptr_t)args[A_STAGING];
    const int ip64 = (flags & F_INDPTR64) != 0, l64 = (flags & F_LAST64) != 0, id64 = (flags & F_IDS64) != 0;
    const int host_ids = (flags & F_HOST_IDS) != 0;
    /* numpy's dtype of the lengths (and of the split arithmetic): int32 when both tables are int32 */
    const int dt32 = !ip64 && !l64;
    const int64_t page_size = args[D_PAGE], window_left = args[D_WINDOW], block_n = args[D_BLOCK_N];
    const int graph = args[D_GRAPH] != 0;
    const int64_t max_batch = args[D_MAX_BATCH], max_work = args[D_MAX_WORK], align = args[D_ALIGN];
    const int64_t window = window_left >= 0 ? window_left + 1 : -1;
    int64_t batch = n_indptr - 1, sum_span = 0, max_index = -1, chunk = 0, num_work, b;
    int full = 1, split, rc;

    rc = check_table(indptr, n_indptr, ip64, last, n_last, l64, n_ids, page_size, window, &full, &sum_span);
    if (rc != PLAN_OK)
        return rc;
    if (host_ids && (rc = check_ids(ids, n_ids, id64, num_pages, &max_index)) != PLAN_OK)
        return rc;
    if (graph && (batch > max_batch || at(indptr, ip64, batch) > args[D_IDS_CAP] || max_work < batch))
        return PLAN_INVALID;
    if (dt32 && window > I32_MAX)
        return PLAN_UNSUPPORTED; /* numpy: minimum(int32 lengths, window) raises OverflowError */

    /* the split decision and the chunk size, as decode.py */
    split = !args[D_DISABLE_SPLIT] && batch > 0 &&
            (args[D_CHUNK] > 0 || graph || batch * args[D_KV_HEADS] < args[D_SPLIT_BELOW]);
    num_work = batch;
    if (split) {
        if (args[D_CHUNK] > 0) {
            chunk = args[D_CHUNK];
        } else {
            int64_t want = max_work - batch < args[D_TARGET] ? max_work - batch : args[D_TARGET];
            int64_t per = cdiv(sum_span, want > 1 ? want : 1);
            chunk = round_up(per > args[D_MIN_CHUNK] ? per : args[D_MIN_CHUNK], block_n);
        }
        if (chunk > I32_MAX)
            return PLAN_UNSUPPORTED; /* numpy: an int32 constant out of range raises OverflowError */
        num_work = 0;
        for (b = 0; b < batch; b++) {
            int64_t len = kv_len(indptr, ip64, last, l64, page_size, b);
            int64_t span = (window >= 0 && len > window) ? window : len;
            int64_t n = (span + chunk - 1) / chunk;
            if (dt32 && span + chunk - 1 > I32_MAX)
                return PLAN_UNSUPPORTED; /* numpy's int32 span + chunk - 1 wraps */
            num_work += (!full && n < 1) ? 1 : n;
        }
        if (dt32 && num_work > I32_MAX)
            return PLAN_UNSUPPORTED; /* numpy's int32 running sum wraps */
        if (num_work > max_work) { /* a forced chunk size past the workspace: one item per request */
            if (graph)
                return PLAN_INVALID;
            split = 0;
            num_work = batch;
        }
    }

    /* the layout (decode.py _make_layout) and the room it needs */
    {
        const int64_t wcap = graph ? args[D_LAYOUT_WORK] : num_work, bcap = graph ? max_batch : batch;
        const int64_t ws = round_up(wcap > 1 ? wcap : 1, align), bs = round_up(bcap + 1, align);
        const int64_t off_req = align, off_chunk = off_req + ws;
        const int64_t off_work_indptr = off_chunk + bs, off_kv_indptr = off_chunk + 2 * bs;
        const int64_t off_len = off_chunk + 3 * bs, fixed_end = off_chunk + 4 * bs;
        const int64_t need = fixed_end + (host_ids && !graph ? n_ids : 0);
        args[O_NEED] = need;
        if (need > h_size)
            return PLAN_NEED_ROOM;
        if (num_work > ws || (graph && max_batch + 1 > bs))
            return PLAN_UNSUPPORTED; /* a layout this file does not know (cannot happen: defensive) */

        /* every check passed: write (only inside [0, need)) */
        h[0] = (int32_t)num_work;
        copy_ints(h + off_kv_indptr, indptr, ip64, batch + 1);
        for (b = 0; b < batch; b++)
            h[off_len + b] = (int32_t)kv_len(indptr, ip64, last, l64, page_size, b);
        if (split) { /* each request's items: work_indptr, and the request of each item */
            int32_t *wi = h + off_work_indptr, *req = h + off_req;
            int64_t end = 0, k;
            wi[0] = 0;
            for (b = 0; b < batch; b++) {
                int64_t len = kv_len(indptr, ip64, last, l64, page_size, b);
                int64_t span = (window >= 0 && len > window) ? window : len;
                int64_t n = (span + chunk - 1) / chunk;
                if (!full && n < 1)
                    n = 1;
                for (k = 0; k < n; k++)
                    req[end + k] = (int32_t)b;
                end += n;
                wi[b + 1] = (int32_t)end;
            }
        } else if (graph) { /* graph mode always takes the split path: one chunk per request */
            for (b = 0; b <= batch; b++)
                h[off_work_indptr + b] = (int32_t)b;
            for (b = 0; b < batch; b++)
                h[off_req + b] = (int32_t)b;
        }
        if (graph) /* rows a graph captured at a larger batch merges: none */
            for (b = batch + 1; b <= max_batch; b++)
                h[off_work_indptr + b] = (int32_t)num_work;
        if (host_ids && !graph)
            copy_ints(h + fixed_end, ids, id64, n_ids);
    }
    args[O_NUM_WORK] = num_work;
    args[O_SPLIT] = split;
    args[O_MAX_INDEX] = max_index;
    return PLAN_OK;
}

/* ----------------------------------------------------------------------------------------- prefill */

/* Merge sort of a[0:n] (distinct keys) whose runs [bounds[r], bounds[r + 1]) are each ascending:
 * adjacent runs merged pairwise, ceil(log2(runs)) passes between a and tmp. Returns where the sorted
 * keys are (a or tmp). bounds [runs + 1] is overwritten. */
static uint64_t *merge_runs(uint64_t *a, uint64_t *tmp, int64_t *bounds, int64_t runs) {
    uint64_t *src = a, *dst = tmp, *t;
    const int64_t n = bounds[runs];
    while (runs > 1) {
        int64_t r, out = 0;
        for (r = 0; r < runs; r += 2) {
            const int64_t lo = bounds[r], mid = bounds[r + 1], hi = r + 2 <= runs ? bounds[r + 2] : mid;
            int64_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = src[j] < src[i] ? src[j++] : src[i++];
            while (i < mid)
                dst[k++] = src[i++];
            while (j < hi)
                dst[k++] = src[j++];
            bounds[out++] = lo; /* out <= r / 2: bounds not yet read stay intact */
        }
        bounds[out] = n;
        runs = out;
        t = src, src = dst, dst = t;
    }
    return src;
}

/* BatchPrefillWithPagedKVCacheWrapper.plan()'s host work without a custom mask (prefill.py: its
 * numpy path is the reference): the page-table and id checks as decode's (the same A_* inputs), then
 * A_QO [A_N_QO], qo_indptr (start at 0, non-decreasing, one per request + 1), the query tiles of
 * P_BLOCK_M rows (<= P_MAX_TILES), causal ones heaviest first, and the staging buffer (prefill.py
 * _make_layout): h[0] = T, tile_req [T] at P_ALIGN, tile_q0 [T], then per request qo_indptr [B + 1],
 * kv_indptr [B + 1], kv_len [B], mask offsets (unused here), then the host ids. Results O_*. */
int moecomm_prefill_plan(int64_t *args) {
    const void *indptr = (const void *)(intptr_t)args[A_INDPTR], *last = (const void *)(intptr_t)args[A_LAST];
    const void *ids = (const void *)(intptr_t)args[A_IDS], *qo = (const void *)(intptr_t)args[A_QO];
    const int64_t n_indptr = args[A_N_INDPTR], n_last = args[A_N_LAST], n_ids = args[A_N_IDS], n_qo = args[A_N_QO];
    const int64_t flags = args[A_FLAGS], num_pages = args[A_NUM_PAGES], h_size = args[A_STAGING_SIZE];
    int32_t *h = (int32_t *)(intptr_t)args[A_STAGING];
    const int ip64 = (flags & F_INDPTR64) != 0, l64 = (flags & F_LAST64) != 0, id64 = (flags & F_IDS64) != 0;
    const int q64 = (flags & F_QO64) != 0, host_ids = (flags & F_HOST_IDS) != 0, causal = (flags & F_CAUSAL) != 0;
    const int64_t page_size = args[P_PAGE], block_m = args[P_BLOCK_M], align = args[P_ALIGN];
    const int graph = args[P_GRAPH] != 0;
    const int64_t max_batch = args[P_MAX_BATCH];
    int64_t batch = n_indptr - 1, sum_span, max_index = -1, num_tiles = 0, prev, b, consecutive = 0;
    int full, rc;

    rc = check_table(indptr, n_indptr, ip64, last, n_last, l64, n_ids, page_size, -1, &full, &sum_span);
    if (rc != PLAN_OK)
        return rc;
    if (host_ids && (rc = check_ids(ids, n_ids, id64, num_pages, &max_index)) != PLAN_OK)
        return rc;
    if (n_qo != batch + 1 || at(qo, q64, 0) != 0)
        return PLAN_INVALID;
    prev = 0;
    for (b = 0; b < batch; b++) {
        const int64_t next = at(qo, q64, b + 1);
        if (next < prev)
            return PLAN_INVALID;
        if (next - prev > I32_MAX - block_m)
            return PLAN_UNSUPPORTED; /* numpy's int32 qo_len + BLOCK_M - 1 wraps */
        num_tiles += (next - prev + block_m - 1) / block_m;
        if (num_tiles > args[P_MAX_TILES])
            return PLAN_INVALID; /* past CUDA's grid limit (checked per request: the sum cannot overflow) */
        prev = next;
    }
    if (graph && (batch > max_batch || prev > args[P_MAX_TOKENS] || n_ids > args[P_IDS_CAP]))
        return PLAN_INVALID;
    if (causal && batch > 1 && batch > (int64_t)UINT32_MAX)
        return PLAN_UNSUPPORTED; /* the sort keys carry the request id in 32 bits */
    if ((flags & F_CONSECUTIVE) && host_ids && !graph) { /* prefill.py pages_consecutive */
        int64_t s = 0, i;
        consecutive = 1;
        for (b = 0; b < batch && consecutive; b++) {
            const int64_t e = at(indptr, ip64, b + 1);
            for (i = s + 1; i < e; i++)
                if (at(ids, id64, i) - at(ids, id64, i - 1) != 1) {
                    consecutive = 0;
                    break;
                }
            s = e;
        }
    }

    {
        const int64_t tcap = graph ? args[P_TILE_CAP] : num_tiles, bcap = graph ? max_batch : batch;
        const int64_t ts = round_up(tcap > 1 ? tcap : 1, align), bs = round_up(bcap + 1, align);
        const int64_t off_tile_req = align, off_tile_q0 = align + ts, off_qo_indptr = align + 2 * ts;
        const int64_t off_kv_indptr = off_qo_indptr + bs, off_kv_len = off_qo_indptr + 2 * bs;
        const int64_t fixed_end = off_qo_indptr + 4 * bs;
        const int64_t need = fixed_end + (host_ids && !graph ? n_ids : 0);
        int32_t *tile_req = h + off_tile_req, *tile_q0 = h + off_tile_q0;
        uint64_t *keys = NULL, *tmp = NULL, *sorted = NULL;
        int64_t *bounds = NULL;
        args[O_P_NEED] = need;
        if (need > h_size)
            return PLAN_NEED_ROOM;
        if (num_tiles > ts)
            return PLAN_UNSUPPORTED; /* defensive: graph mode's tile_cap bounds num_tiles */
        if (causal && batch > 1 && num_tiles > 0) {
            /* heaviest first (prefill.py): ascending key = (qo_len - kv_len) - q0 = -(the tile's first
             * row's position in the KV), ties in build order (request, then its tiles last first). The
             * key is in (-2**31, 2**31) (qo_len, kv_len in [0, 2**31), q0 < qo_len), so
             * (key + 2**31) << 32 | b is unique per tile and orders as the stable sort does; each
             * request's tiles, built last first, are one ascending run. */
            int64_t runs = 0, g = 0, j;
            keys = (uint64_t *)malloc((size_t)(3 * num_tiles + 1) * sizeof(uint64_t));
            if (keys == NULL)
                return PLAN_NO_MEMORY;
            tmp = keys + num_tiles;
            bounds = (int64_t *)(tmp + num_tiles);
            for (b = 0; b < batch; b++) {
                const int64_t ql = at(qo, q64, b + 1) - at(qo, q64, b), nt = (ql + block_m - 1) / block_m;
                const int64_t c = ql - kv_len(indptr, ip64, last, l64, page_size, b);
                if (nt == 0)
                    continue;
                bounds[runs++] = g;
                for (j = nt - 1; j >= 0; j--)
                    keys[g++] = ((uint64_t)(c - j * block_m + (INT64_C(1) << 31)) << 32) | (uint64_t)b;
            }
            bounds[runs] = g;
            sorted = merge_runs(keys, tmp, bounds, runs);
        }

        /* every check passed: write (only inside [0, need)) */
        h[0] = (int32_t)num_tiles;
        if (sorted != NULL) {
            int64_t g;
            for (g = 0; g < num_tiles; g++) {
                const int64_t rb = (int64_t)(sorted[g] & UINT64_C(0xffffffff));
                const int64_t key = (int64_t)(sorted[g] >> 32) - (INT64_C(1) << 31);
                const int64_t ql = at(qo, q64, rb + 1) - at(qo, q64, rb);
                tile_req[g] = (int32_t)rb;
                tile_q0[g] = (int32_t)(ql - kv_len(indptr, ip64, last, l64, page_size, rb) - key);
            }
            free(keys);
        } else {
            int64_t g = 0, j;
            for (b = 0; b < batch; b++) {
                const int64_t nt = (at(qo, q64, b + 1) - at(qo, q64, b) + block_m - 1) / block_m;
                for (j = 0; j < nt; j++, g++) { /* causal with one request: its tiles last first */
                    tile_req[g] = (int32_t)b;
                    tile_q0[g] = (int32_t)((causal ? nt - 1 - j : j) * block_m);
                }
            }
        }
        copy_ints(h + off_qo_indptr, qo, q64, batch + 1);
        copy_ints(h + off_kv_indptr, indptr, ip64, batch + 1);
        for (b = 0; b < batch; b++)
            h[off_kv_len + b] = (int32_t)kv_len(indptr, ip64, last, l64, page_size, b);
        if (host_ids && !graph)
            copy_ints(h + fixed_end, ids, id64, n_ids);
    }
    args[O_NUM_TILES] = num_tiles;
    args[O_P_MAX_INDEX] = max_index;
    args[O_CONSECUTIVE] = consecutive;
    args[O_NNZ] = batch >= 0 ? at(qo, q64, batch) : 0;
    return PLAN_OK;
}
