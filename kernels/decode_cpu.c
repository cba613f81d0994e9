/* One decoding step of a float32 Mamba2 LM on a CPU, every layer in one call.

   The same arithmetic as `Mamba2LM._step_torch` in minimamba/model.py (its PyTorch reference, tested equal
   in tests/test_decode_cpu.py), with the glossary of minimamba/ssd.py: D = d_model, E = d_inner, H heads of
   P channels, G groups of N state entries, K conv taps, Din = 2E + 2GN + H rows of in_proj.

   For each sequence b of the batch and each layer:
     u          = RMSNorm(residual) · norm_w                                         (D)
     [z|xBC|dt] = in_w · u (+ in_b)                                                  (E | E+2GN | H)
     xBC        = silu(conv_b + Σ_k conv_w[:, k] · [history, xBC][k])               (E+2GN), history ← last K-1
     x, B, C    = xBC split                                                          (H·P), (G·N), (G·N)
     dt_h       = softplus(dt_h + dt_bias_h),  A_h = −exp(A_log_h)
     h[h,p,:]   ← exp(dt_h·A_h) · h[h,p,:] + dt_h · x[h,p] · B[g]                   g = h / (H/G)
     y[h,p]     = h[h,p,:] · C[g] + D_h · x[h,p]
     y          = RMSNorm over each of the G groups of E/G (y · silu(z)) · gnorm_w      (E)
     residual  += out_w · y (+ out_b)                                                (D)
   then logits = head_w · (RMSNorm(residual) · norm_f_w)                              (Vp)

   Why a kernel: at batch 1 a decoding step reads every weight once and does two flops per weight, so its
   time is the bytes of the weights divided by the memory bandwidth. Library matrix-vector products reach
   ~65–80% of the bandwidth here and the ~20 small tensor ops per layer add half as much again; this file
   streams each weight row once with all threads (the row loops are split across OpenMP threads) and keeps
   the small ops in the same parallel region: the step costs 1.1–1.25× the bytes/bandwidth floor, the torch
   step 1.65× (README, CPU benchmarks).

   Threads: one `omp parallel` region per step; the loops below are orphaned `omp for`s that share it out,
   and `omp single` runs the tiny per-row norms. Built by kernels/decode_cpu.py with the system C compiler
   (-O3 -march=native -fopenmp); OpenMP resolves to the libgomp that PyTorch already loaded. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int n_layer, d_model, d_inner, nheads, headdim, ngroups, d_state, d_conv, vocab;  /* vocab: head rows (Vp) */
    float eps;  /* of every RMSNorm */
} Dims;

typedef struct {  /* one layer's weights, all contiguous float32; optional ones may be NULL */
    const float *norm_w;              /* (D)         pre-norm weight */
    const float *in_w, *in_b;         /* (Din, D), (Din) or NULL */
    const float *conv_w, *conv_b;     /* (E+2GN, K), (E+2GN) or NULL */
    const float *dt_bias, *A_log, *D; /* (H) each; D may be NULL */
    const float *gnorm_w;             /* (E)         gated-norm weight */
    const float *out_w, *out_b;       /* (D, E), (D) or NULL */
} Layer;

static int conv_dim(const Dims *d) { return d->d_inner + 2 * d->ngroups * d->d_state; }  /* E + 2GN: [x|B|C] */

static int in_proj_dim(const Dims *d) { return d->d_inner + conv_dim(d) + d->nheads; }   /* Din: [z|x|B|C|dt] */

/* Floats of scratch one step needs for `batch` sequences (the caller allocates them once). */
size_t mamba2_step_workspace(const Dims *d, int batch) {
    /* residual (D), normed input (D), in_proj output (Din), conv output (E+2GN), y (E) */
    return (size_t)batch * (2 * (size_t)d->d_model + in_proj_dim(d) + conv_dim(d) + d->d_inner);
}

static float silu(float v) { return v / (1.0f + expf(-v)); }

static float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }  /* torch's threshold 20 */

/* 8 floats in one vector register (a GCC/Clang vector extension: an AVX register with -march=native on x86). */
typedef float f32x8 __attribute__((vector_size(32)));

static f32x8 load8(const float *p) {  /* an unaligned load */
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* a · b over n floats, summed in 8 independent vector accumulators. A matrix-vector product is a stream of
   these over the weight rows, and eight sums in flight keep enough loads going to read at the memory's speed:
   one accumulator chain makes the decoding step ~10% slower on the benchmark machine. */
static float dot(const float *a, const float *b, int n) {
    f32x8 acc[8] = {0};
    int i = 0;
    for (; i + 64 <= n; i += 64)
        for (int k = 0; k < 8; k++) acc[k] += load8(a + i + 8 * k) * load8(b + i + 8 * k);
    for (int k = 1; k < 8; k++) acc[0] += acc[k];  /* vector adds first: a short chain of dependent adds */
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += acc[0][j];
    for (; i < n; i++) s += a[i] * b[i];  /* the last n % 64 */
    return s;
}

/* out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · w for `rows` rows of n; one thread does it. */
static void rmsnorm(const float *x, const float *w, float *out, int rows, int n, float eps) {
#pragma omp single
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float scale = 1.0f / sqrtf(dot(xr, xr, n) / n + eps);
        for (int i = 0; i < n; i++) out[(size_t)r * n + i] = xr[i] * scale * w[i];
    }
}

/* y[b, o] = (accumulate ? y[b, o] : 0) + bias[o] + W[o, :] · x[b, :] for o < rows. The threads share out W's
   rows; each row is read from memory once and applied to every sequence of the batch while it is in cache. */
static void matvec(const float *W, const float *bias, const float *x, float *y, int rows, int cols, int batch,
                   int accumulate) {
#pragma omp for schedule(static)
    for (int o = 0; o < rows; o++)
        for (int b = 0; b < batch; b++) {
            float v = dot(W + (size_t)o * cols, x + (size_t)b * cols, cols) + (bias ? bias[o] : 0.0f);
            float *yo = y + (size_t)b * rows + o;
            *yo = accumulate ? *yo + v : v;
        }
}

/* The causal depthwise conv on one new input per channel, then SiLU; shifts the history by one.
   zxbcdt (batch, Din) holds xBC at offset E; history (batch, K-1, conv_dim); out (batch, conv_dim). */
static void conv_step(const Layer *L, const Dims *d, const float *zxbcdt, float *history, float *out, int batch) {
    int K = d->d_conv, cd = conv_dim(d), din = in_proj_dim(d);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < batch; b++)
        for (int c = 0; c < cd; c++) {
            float *hist = history + (size_t)b * (K - 1) * cd + c;  /* hist[k * cd], k < K-1 */
            const float *w = L->conv_w + (size_t)c * K;
            float new_in = zxbcdt[(size_t)b * din + d->d_inner + c];
            float v = L->conv_b ? L->conv_b[c] : 0.0f;
            for (int k = 0; k < K - 1; k++) v += w[k] * hist[(size_t)k * cd];
            v += w[K - 1] * new_in;
            for (int k = 0; k < K - 2; k++) hist[(size_t)k * cd] = hist[(size_t)(k + 1) * cd];
            if (K > 1) hist[(size_t)(K - 2) * cd] = new_in;
            out[(size_t)b * cd + c] = silu(v);
        }
}

/* The recurrence for every (sequence, head): state (batch, H, P, N) updated in place, y (batch, E). */
static void ssm_step(const Layer *L, const Dims *d, const float *zxbcdt, const float *xBC, float *state, float *y,
                     int batch) {
    int H = d->nheads, P = d->headdim, N = d->d_state, G = d->ngroups;
    int cd = conv_dim(d), din = in_proj_dim(d);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < batch; b++)
        for (int h = 0; h < H; h++) {
            int g = h / (H / G);
            const float *x = xBC + (size_t)b * cd + (size_t)h * P;                        /* (P) */
            const float *B = xBC + (size_t)b * cd + d->d_inner + (size_t)g * N;           /* (N) */
            const float *C = B + (size_t)G * N;                                           /* (N) */
            float dt = softplus(zxbcdt[(size_t)b * din + d->d_inner + cd + h] + L->dt_bias[h]);
            float decay = expf(dt * -expf(L->A_log[h]));
            float Dh = L->D ? L->D[h] : 0.0f;
            float *hs = state + ((size_t)b * H + h) * P * N;                               /* (P, N) */
            for (int p = 0; p < P; p++) {
                float *row = hs + (size_t)p * N, xdt = dt * x[p], acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int n = 0; n < N; n++) {
                    row[n] = decay * row[n] + xdt * B[n];
                    acc += row[n] * C[n];
                }
                y[(size_t)b * d->d_inner + (size_t)h * P + p] = acc + Dh * x[p];
            }
        }
}

/* y ← RMSNorm(y · silu(z)) · w over each group of E/G channels, for every (sequence, group). */
static void gated_norm(const Layer *L, const Dims *d, const float *zxbcdt, float *y, int batch) {
    int E = d->d_inner, G = d->ngroups, n = E / G, din = in_proj_dim(d);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < batch; b++)
        for (int g = 0; g < G; g++) {
            float *yg = y + (size_t)b * E + (size_t)g * n;
            const float *z = zxbcdt + (size_t)b * din + (size_t)g * n;
            for (int i = 0; i < n; i++) yg[i] *= silu(z[i]);
            float scale = 1.0f / sqrtf(dot(yg, yg, n) / n + d->eps);
            for (int i = 0; i < n; i++) yg[i] *= scale * L->gnorm_w[g * n + i];
        }
}

/* One step for `batch` sequences: tokens (batch) -> logits (batch, Vp).
   conv_state (n_layer, batch, K-1, E+2GN) and ssm_state (n_layer, batch, H, P, N) are updated in place;
   work holds mamba2_step_workspace(d, batch) floats. */
void mamba2_step(const Dims *d, const Layer *layers, const float *embedding, const float *norm_f_w,
                 const float *head_w, const int64_t *tokens, int batch, float *conv_state, float *ssm_state,
                 float *work, float *logits, int nthreads) {
    int Dm = d->d_model, E = d->d_inner, cd = conv_dim(d), din = in_proj_dim(d);
    float *residual = work;                          /* (batch, D) */
    float *u = residual + (size_t)batch * Dm;        /* (batch, D) */
    float *zxbcdt = u + (size_t)batch * Dm;          /* (batch, Din) */
    float *xBC = zxbcdt + (size_t)batch * din;       /* (batch, E+2GN) */
    float *y = xBC + (size_t)batch * cd;             /* (batch, E) */
    size_t conv_layer = (size_t)batch * (d->d_conv - 1) * cd;
    size_t ssm_layer = (size_t)batch * d->nheads * d->headdim * d->d_state;

#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for
        for (int b = 0; b < batch; b++)
            for (int i = 0; i < Dm; i++) residual[(size_t)b * Dm + i] = embedding[(size_t)tokens[b] * Dm + i];
        for (int l = 0; l < d->n_layer; l++) {
            const Layer *L = layers + l;
            rmsnorm(residual, L->norm_w, u, batch, Dm, d->eps);
            matvec(L->in_w, L->in_b, u, zxbcdt, din, Dm, batch, 0);
            conv_step(L, d, zxbcdt, conv_state + l * conv_layer, xBC, batch);
            ssm_step(L, d, zxbcdt, xBC, ssm_state + l * ssm_layer, y, batch);
            gated_norm(L, d, zxbcdt, y, batch);
            matvec(L->out_w, L->out_b, y, residual, Dm, E, batch, 1);
        }
        rmsnorm(residual, norm_f_w, u, batch, Dm, d->eps);
        matvec(head_w, NULL, u, logits, d->vocab, Dm, batch, 0);
    }
}
