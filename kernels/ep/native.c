/* The NCCL dispatcher's host orchestration in one C call per phase (moecomm/ep/nccl/native.py).
 *
 * # W = ep_size; a "program" = the int64 op list one phase of a dispatch or combine queues
 *
 * Why: an eager dispatch + combine round trip queues 7 Triton kernels, 3 all_to_alls and one
 * device-to-host copy of the counts. Through Python each is 11-25 us of host time on the H200
 * host (Triton's launcher, c10d's all_to_all_single), 420-780 us a round trip where its kernels
 * take ~180 us. Here the Python side records what it would queue (moecomm.jit.launch's Launcher
 * in record mode, the dispatcher's exchanges) as a flat int64 program, and this file queues it:
 * cuLaunchKernel on the compiled Triton kernels' function handles, ncclSend / ncclRecv in one
 * group on the current stream (torch's communicator of the group, borrowed), the copy, and a
 * bounded wait.
 *
 * Ops (each a run of int64 in the program):
 *   OP_LAUNCH  1, family, gx, gy, gz, nargs, arg[0..nargs)   args: pointers and ints, in the
 *              kernel's runtime-argument order; the family's variant whose specialisation
 *              classes match the values is launched (none: status MC_RESPECIALISE, nothing queued)
 *   OP_A2A     2, send, recv, unit_bytes, W, send_units[W], recv_units[W]   one ncclGroup of
 *              W sends and W receives (a zero count skips that call), rank p's part at the sum of
 *              the counts before p; W == 1 (a one-rank group: the counts must be equal) is one
 *              cuMemcpyDtoDAsync, no NCCL (what c10d does for a one-rank all_to_all_single)
 *   OP_D2H     3, host_dst, device_src, bytes               cuMemcpyDtoHAsync
 *   OP_COPY    5, device_dst, device_src, bytes             cuMemcpyDtoDAsync
 *   OP_WAIT    4                                            spin on cuStreamQuery until the
 *              stream is idle, checking the communicator's async error; bounded by timeout_ns
 * moecomm_native_run_patched queues a copy of a program (a Template's, native.py) with some slots
 * rewritten first: an address in one of the call's sources (the source's address + an offset, of
 * the recorded 16-byte alignment: another one answers MC_RESPECIALISE, nothing queued, as Triton
 * would specialise otherwise) and runs of values (an exchange's split sizes).
 * Every program is validated (op layout, a variant for every launch) before anything is queued,
 * so a non-zero status from validation means nothing ran and the caller may take its Python path.
 *
 * Specialisation classes (what Triton 3.6 specialises a runtime argument on; moecomm.jit.launch's
 * spec_key): a pointer: 16-byte aligned (1) or not (2); an int: 16 + (== 1) + 2 * (divisible by
 * 16) + 4 * width (0 i32, 1 i64); 0: not checked (a None). Parameter kinds of the cubin: 1 pointer,
 * 2 int32, 3 int64. After the runtime parameters Triton 3.6 kernels take `extra` null pointers
 * (its global and profile scratch).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MC_VERSION 4
#define MAX_FAMILIES 256
#define MAX_VARIANTS 8
#define MAX_ARGS 48
#define MAX_PARAMS 52
#define MAX_W 1024
#define MAX_PROG 4096 /* a patched program's length (moecomm_native_run_patched) */

/* statuses */
#define MC_OK 0
#define MC_RESPECIALISE 1 /* info[0] = the op's offset in the program, info[1] = the family */
#define MC_CUDA_ERROR 2   /* info[0] = op offset, info[1] = CUresult */
#define MC_NCCL_ERROR 3   /* info[0] = op offset, info[1] = ncclResult_t */
#define MC_TIMEOUT 4      /* info[0] = op offset */
#define MC_BAD_PROGRAM 5  /* info[0] = op offset */
#define MC_NOT_READY 6    /* mc_init was not called */

#define OP_LAUNCH 1
#define OP_A2A 2
#define OP_D2H 3
#define OP_WAIT 4
#define OP_COPY 5

#define CUDA_ERROR_NOT_READY 600
#define NCCL_IN_PROGRESS 7
#define NCCL_INT8 0

typedef int (*launch_fn)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                         unsigned smem, void *stream, void **params, void **extra);
typedef int (*query_fn)(void *stream);
typedef int (*d2h_fn)(void *dst, uint64_t src, size_t bytes, void *stream);
typedef int (*d2d_fn)(uint64_t dst, uint64_t src, size_t bytes, void *stream);
typedef int (*group_fn)(void);
typedef int (*p2p_fn)(const void *buf, size_t count, int dtype, int peer, void *comm, void *stream);
typedef int (*async_error_fn)(void *comm, int *result);

static struct {
    launch_fn launch;
    query_fn query;
    d2h_fn d2h;
    d2d_fn d2d;
    group_fn group_start, group_end;
    p2p_fn send, recv;
    async_error_fn async_error;
    int ready;
} api;

typedef struct {
    void *function;
    int64_t block, smem, nargs, nparams, extra;
    int8_t cls[MAX_ARGS];       /* expected class of each runtime argument */
    int8_t param_arg[MAX_PARAMS]; /* which argument each cubin parameter takes */
    int8_t param_kind[MAX_PARAMS];
} variant_t;

typedef struct {
    int nvariants;
    variant_t v[MAX_VARIANTS];
} family_t;

static family_t families[MAX_FAMILIES];
static int nfamilies;

int moecomm_native_version(void) { return MC_VERSION; }

/* fns: cuLaunchKernel, cuStreamQuery, cuMemcpyDtoHAsync_v2, ncclGroupStart, ncclGroupEnd, ncclSend,
 * ncclRecv, ncclCommGetAsyncError, cuMemcpyDtoDAsync_v2 (addresses; the tests pass stand-ins) */
int moecomm_native_init(const int64_t *fns, int64_t n) {
    if (n != 9) return MC_BAD_PROGRAM;
    api.launch = (launch_fn)(intptr_t)fns[0];
    api.query = (query_fn)(intptr_t)fns[1];
    api.d2h = (d2h_fn)(intptr_t)fns[2];
    api.group_start = (group_fn)(intptr_t)fns[3];
    api.group_end = (group_fn)(intptr_t)fns[4];
    api.send = (p2p_fn)(intptr_t)fns[5];
    api.recv = (p2p_fn)(intptr_t)fns[6];
    api.async_error = (async_error_fn)(intptr_t)fns[7];
    api.d2d = (d2d_fn)(intptr_t)fns[8];
    api.ready = 1;
    return MC_OK;
}

/* A new family (its first variant comes with moecomm_native_add_variant): its id, or -1 when full. */
int64_t moecomm_native_new_family(void) {
    if (nfamilies >= MAX_FAMILIES) return -1;
    families[nfamilies].nvariants = 0;
    return nfamilies++;
}

/* desc: family, function, block, smem, nargs, nparams, extra, cls[nargs], param_arg[nparams],
 * param_kind[nparams]. Returns the variant's index, or -1 (bad description, or the family full). */
int64_t moecomm_native_add_variant(const int64_t *desc, int64_t n) {
    if (n < 7) return -1;
    int64_t fam = desc[0], nargs = desc[4], nparams = desc[5], extra = desc[6];
    if (fam < 0 || fam >= nfamilies || nargs < 0 || nargs > MAX_ARGS || nparams < 0 || extra < 0
        || nparams + extra > MAX_PARAMS || n != 7 + nargs + 2 * nparams)
        return -1;
    family_t *f = &families[fam];
    if (f->nvariants >= MAX_VARIANTS) return -1;
    variant_t *v = &f->v[f->nvariants];
    v->function = (void *)(intptr_t)desc[1];
    v->block = desc[2];
    v->smem = desc[3];
    v->nargs = nargs;
    v->nparams = nparams;
    v->extra = extra;
    const int64_t *p = desc + 7;
    for (int64_t i = 0; i < nargs; i++) v->cls[i] = (int8_t)p[i];
    p += nargs;
    for (int64_t i = 0; i < nparams; i++) {
        if (p[i] < 0 || p[i] >= nargs) return -1;
        v->param_arg[i] = (int8_t)p[i];
    }
    p += nparams;
    for (int64_t i = 0; i < nparams; i++) {
        if (p[i] < 1 || p[i] > 3) return -1;
        v->param_kind[i] = (int8_t)p[i];
    }
    return f->nvariants++;
}

/* the class of value a for an argument expected in class `want` (see the header) */
static int class_of(int64_t a, int want) {
    if (want == 0) return 0;
    if (want < 16) return (a & 15) == 0 ? 1 : 2;
    int width = (a >= -2147483648LL && a < 2147483648LL) ? 0 : 1;
    return 16 + (a == 1) + 2 * (a != 1 && a % 16 == 0) + 4 * width;
}

static const variant_t *choose(const family_t *f, const int64_t *args, int64_t nargs) {
    for (int i = 0; i < f->nvariants; i++) {
        const variant_t *v = &f->v[i];
        if (v->nargs != nargs) continue;
        int ok = 1;
        for (int64_t j = 0; j < nargs && ok; j++) ok = class_of(args[j], v->cls[j]) == v->cls[j];
        if (ok) return v;
    }
    return NULL;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* One pass over the program: validate only (run = 0) or queue it (run = 1). */
static int walk(const int64_t *prog, int64_t n, void *stream, void *comm, int64_t timeout_ns, int64_t *info, int run) {
    int64_t at = 0;
    while (at < n) {
        int64_t op = prog[at];
        info[0] = at;
        if (op == OP_LAUNCH) {
            if (at + 6 > n) return MC_BAD_PROGRAM;
            int64_t fam = prog[at + 1], nargs = prog[at + 5];
            if (fam < 0 || fam >= nfamilies || nargs < 0 || nargs > MAX_ARGS || at + 6 + nargs > n) return MC_BAD_PROGRAM;
            const int64_t *args = prog + at + 6;
            const variant_t *v = choose(&families[fam], args, nargs);
            if (v == NULL) {
                info[1] = fam;
                return MC_RESPECIALISE;
            }
            int64_t gx = prog[at + 2], gy = prog[at + 3], gz = prog[at + 4];
            if (gx < 0 || gy < 0 || gz < 0 || gx > 2147483647LL || gy > 65535 || gz > 65535) return MC_BAD_PROGRAM;
            if (run && gx > 0 && gy > 0 && gz > 0) { /* an empty grid launches nothing (Triton's rule) */
                int64_t slots[MAX_PARAMS];
                void *params[MAX_PARAMS];
                int64_t np = v->nparams;
                for (int64_t i = 0; i < np; i++) {
                    int64_t a = args[v->param_arg[i]];
                    if (v->param_kind[i] == 2) {
                        int32_t a32 = (int32_t)a;
                        memcpy(&slots[i], &a32, sizeof a32);
                    } else {
                        slots[i] = a;
                    }
                    params[i] = &slots[i];
                }
                for (int64_t i = 0; i < v->extra; i++) {
                    slots[np + i] = 0;
                    params[np + i] = &slots[np + i];
                }
                int rc = api.launch(v->function, (unsigned)gx, (unsigned)gy, (unsigned)gz, (unsigned)v->block, 1, 1,
                                    (unsigned)v->smem, stream, params, NULL);
                if (rc != 0) {
                    info[1] = rc;
                    return MC_CUDA_ERROR;
                }
            }
            at += 6 + nargs;
        } else if (op == OP_A2A) {
            if (at + 5 > n) return MC_BAD_PROGRAM;
            int64_t W = prog[at + 4], unit = prog[at + 3];
            if (W < 1 || W > MAX_W || unit < 0 || at + 5 + 2 * W > n) return MC_BAD_PROGRAM;
            const int64_t *sc = prog + at + 5, *rc_ = sc + W;
            for (int64_t p = 0; p < W; p++)
                if (sc[p] < 0 || rc_[p] < 0) return MC_BAD_PROGRAM;
            if (W == 1 && sc[0] != rc_[0]) return MC_BAD_PROGRAM; /* a rank receives what it sends itself */
            if (run && W == 1) {
                if (sc[0] > 0) {
                    int rc = api.d2d((uint64_t)prog[at + 2], (uint64_t)prog[at + 1], (size_t)(sc[0] * unit), stream);
                    if (rc != 0) {
                        info[1] = rc;
                        return MC_CUDA_ERROR;
                    }
                }
            } else if (run) {
                char *send = (char *)(intptr_t)prog[at + 1], *recv = (char *)(intptr_t)prog[at + 2];
                int64_t so = 0, ro = 0;
                int rc = api.group_start();
                for (int64_t p = 0; p < W && (rc == 0 || rc == NCCL_IN_PROGRESS); p++) {
                    if (sc[p] > 0) rc = api.send(send + so * unit, (size_t)(sc[p] * unit), NCCL_INT8, (int)p, comm, stream);
                    if ((rc == 0 || rc == NCCL_IN_PROGRESS) && rc_[p] > 0)
                        rc = api.recv(recv + ro * unit, (size_t)(rc_[p] * unit), NCCL_INT8, (int)p, comm, stream);
                    so += sc[p];
                    ro += rc_[p];
                }
                int end = api.group_end(); /* always closed, also after a failed call inside */
                if (rc == 0 || rc == NCCL_IN_PROGRESS) rc = end;
                if (rc == NCCL_IN_PROGRESS && comm != NULL) { /* a non-blocking communicator: until queued */
                    int64_t deadline = now_ns() + timeout_ns;
                    do {
                        int err = 0;
                        if (api.async_error(comm, &err) != 0) break;
                        rc = err;
                        if (rc == NCCL_IN_PROGRESS && now_ns() > deadline) return MC_TIMEOUT;
                    } while (rc == NCCL_IN_PROGRESS);
                }
                if (rc != 0 && rc != NCCL_IN_PROGRESS) {
                    info[1] = rc;
                    return MC_NCCL_ERROR;
                }
            }
            at += 5 + 2 * W;
        } else if (op == OP_D2H) {
            if (at + 4 > n || prog[at + 3] < 0) return MC_BAD_PROGRAM;
            if (run && prog[at + 3] > 0) {
                int rc = api.d2h((void *)(intptr_t)prog[at + 1], (uint64_t)prog[at + 2], (size_t)prog[at + 3], stream);
                if (rc != 0) {
                    info[1] = rc;
                    return MC_CUDA_ERROR;
                }
            }
            at += 4;
        } else if (op == OP_COPY) {
            if (at + 4 > n || prog[at + 3] < 0) return MC_BAD_PROGRAM;
            if (run && prog[at + 3] > 0) {
                int rc = api.d2d((uint64_t)prog[at + 1], (uint64_t)prog[at + 2], (size_t)prog[at + 3], stream);
                if (rc != 0) {
                    info[1] = rc;
                    return MC_CUDA_ERROR;
                }
            }
            at += 4;
        } else if (op == OP_WAIT) {
            if (run) {
                int64_t deadline = now_ns() + timeout_ns;
                for (int64_t spin = 0;; spin++) {
                    int rc = api.query(stream);
                    if (rc == 0) break;
                    if (rc != CUDA_ERROR_NOT_READY) {
                        info[1] = rc;
                        return MC_CUDA_ERROR;
                    }
                    if ((spin & 63) == 63) {
                        int err = 0;
                        if (comm != NULL && api.async_error(comm, &err) == 0 && err != 0 && err != NCCL_IN_PROGRESS) {
                            info[1] = err;
                            return MC_NCCL_ERROR;
                        }
                        if (now_ns() > deadline) return MC_TIMEOUT;
                    }
                }
            }
            at += 1;
        } else {
            return MC_BAD_PROGRAM;
        }
    }
    return MC_OK;
}

/* Validate, then queue one program on `stream` (statuses above; info: int64[2]). */
int moecomm_native_run(const int64_t *prog, int64_t n, void *stream, void *comm, int64_t timeout_ns, int64_t *info) {
    if (!api.ready) return MC_NOT_READY;
    info[0] = info[1] = 0;
    int rc = walk(prog, n, stream, comm, timeout_ns, info, 0);
    if (rc != MC_OK) return rc;
    return walk(prog, n, stream, comm, timeout_ns, info, 1);
}

static int patch(int64_t *copy, const int64_t *prog, int64_t n, const int64_t *patches, int64_t npatch,
                 const int64_t *srcs, int64_t nsrcs, const int64_t *sets, int64_t nsets, int64_t *info);

/* moecomm_native_run on a copy of prog with (a) patches: npatch quadruples (slot, source, offset,
 * alignment): copy[slot] = srcs[source] + offset, refused (MC_RESPECIALISE, info[0] = -1 - the
 * patch, nothing queued) when that address & 15 is not the alignment; (b) sets: runs of (slot,
 * count, values[count]): copy[slot .. slot + count) = values. Slots out of the program, sources out
 * of srcs: MC_BAD_PROGRAM (a program longer than MAX_PROG is copied to the heap). prog itself is not written. */
int moecomm_native_run_patched(const int64_t *prog, int64_t n, const int64_t *patches, int64_t npatch,
                               const int64_t *srcs, int64_t nsrcs, const int64_t *sets, int64_t nsets,
                               void *stream, void *comm, int64_t timeout_ns, int64_t *info) {
    int64_t local[MAX_PROG];
    if (!api.ready) return MC_NOT_READY;
    info[0] = info[1] = 0;
    if (n < 0 || npatch < 0 || nsrcs < 0 || nsets < 0) return MC_BAD_PROGRAM;
    int64_t *copy = n <= MAX_PROG ? local : (int64_t *)malloc((size_t)n * sizeof(int64_t));
    if (copy == NULL) return MC_BAD_PROGRAM;
    int rc = patch(copy, prog, n, patches, npatch, srcs, nsrcs, sets, nsets, info);
    if (rc == MC_OK) rc = moecomm_native_run(copy, n, stream, comm, timeout_ns, info);
    if (copy != local) free(copy);
    return rc;
}

/* moecomm_native_run_patched with its arguments in one int64 block (one ctypes argument instead of
 * twelve: ~3 us less host time a call on the H200 host): call[0 .. n) = prog, n_prog, patches,
 * npatch, stream, comm, timeout_ns, info, nsrcs, srcs[nsrcs], nsets, sets[nsets]. */
int moecomm_native_run_call(const int64_t *call, int64_t n) {
    if (n < 10) return MC_BAD_PROGRAM;
    int64_t nsrcs = call[8];
    if (nsrcs < 0 || 9 + nsrcs >= n) return MC_BAD_PROGRAM;
    int64_t nsets = call[9 + nsrcs];
    if (nsets < 0 || 10 + nsrcs + nsets != n) return MC_BAD_PROGRAM;
    return moecomm_native_run_patched((const int64_t *)(intptr_t)call[0], call[1], (const int64_t *)(intptr_t)call[2],
                                      call[3], call + 9, nsrcs, call + 10 + nsrcs, nsets, (void *)(intptr_t)call[4],
                                      (void *)(intptr_t)call[5], call[6], (int64_t *)(intptr_t)call[7]);
}

static int patch(int64_t *copy, const int64_t *prog, int64_t n, const int64_t *patches, int64_t npatch,
                 const int64_t *srcs, int64_t nsrcs, const int64_t *sets, int64_t nsets, int64_t *info) {
    memcpy(copy, prog, (size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < npatch; i++) {
        const int64_t *q = patches + 4 * i;
        if (q[0] < 0 || q[0] >= n || q[1] < 0 || q[1] >= nsrcs) {
            info[0] = -1 - i;
            return MC_BAD_PROGRAM;
        }
        int64_t p = srcs[q[1]] + q[2];
        if ((p & 15) != q[3]) {
            info[0] = -1 - i;
            return MC_RESPECIALISE;
        }
        copy[q[0]] = p;
    }
    for (int64_t at = 0; at < nsets;) {
        if (at + 2 > nsets) return MC_BAD_PROGRAM;
        int64_t slot = sets[at], count = sets[at + 1];
        if (slot < 0 || count < 0 || slot + count > n || at + 2 + count > nsets) return MC_BAD_PROGRAM;
        memcpy(copy + slot, sets + at + 2, (size_t)count * sizeof(int64_t));
        at += 2 + count;
    }
    return MC_OK;
}
