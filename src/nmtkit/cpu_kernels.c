/* nmtkit's own CPU kernels, compiled by native.py on first use (plain C, nothing beyond the C library; vectorised
 * by the compiler). Three for a greedy decoding step, one for the training loss:
 *
 * nmtkit_decode_stats_*: the k largest logits of each row with their ids (k = 1 is the argmax) and, when asked,
 *   ln Z = ln sum_i e^x_i and the entropy of softmax(x) in nats. Torch needs three passes over the (B, V) logits
 *   for these (softmax, a product, a sum) plus a top-k. Here each row is read twice while it sits in L1: once for
 *   the top-k, once for s = sum e^(x-m) and d = sum e^(x-m) (x-m), where m is the row's largest logit. Then
 *   ln Z = m + ln s and the entropy is ln s - d / s.
 *
 * nmtkit_attend_one: attention of one query per sentence and head over the cached keys and values, read in the
 *   order they lie in memory (torch's batched matmuls read the position-major cache one sentence and head at a
 *   time, 64 KB apart), with the scale, mask and softmax in the same call.
 *
 * nmtkit_xent_chunk_*: one chunk of rows of the label-smoothed cross-entropy (loss.py) and its gradient with respect
 *   to the logits, written over the logits. Torch's ops make about ten passes over the chunk (copies, max, mean,
 *   exp, sum, the gradient's terms); here each row is read three times while it sits in L1.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 64 /* top-k looks inside a chunk only when the chunk's largest value would enter it */

/* e^z for -87 <= z <= 0 within 3 ulp (2.74 at worst over every float of the range): z = n ln 2 + r with
 * |r| <= ln 2 / 2, e^r by its Taylor polynomial to degree 6, 2^n through the float's exponent bits. Inline, so the
 * loop that calls it vectorises. */
static inline float exp_nonpositive(float z) {
    float n = rintf(z * 1.44269504088896341f);
    float r = z - n * 0.693145751953125f - n * 1.428606820309417232e-6f; /* ln 2 in two parts */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline void insert(float v, int64_t i, int k, float *val, int64_t *idx, int *filled) {
    int j = *filled < k ? (*filled)++ : k - 1;
    while (j > 0 && v > val[j - 1]) { /* strictly greater: on ties the lower id stays first */
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
        j--;
    }
    val[j] = v;
    idx[j] = i;
}

/* The k largest values of row x (length V) into val/idx, descending. Places no value above -inf took (a row of
 * -inf or NaN, which never enter) get the lowest ids not taken yet, with their values: k distinct, valid ids always. */
static void row_top_k(const float *x, int64_t V, int k, float *val, int64_t *idx) {
    int filled = 0;
    for (int j = 0; j < k; j++) val[j] = -INFINITY;
    int64_t i = 0;
    for (; i + CHUNK <= V; i += CHUNK) {
        float chunk_max = -INFINITY;
#pragma omp simd reduction(max : chunk_max)
        for (int c = 0; c < CHUNK; c++) chunk_max = x[i + c] > chunk_max ? x[i + c] : chunk_max;
        if (!(chunk_max > val[k - 1])) continue;
        for (int c = 0; c < CHUNK; c++)
            if (x[i + c] > val[k - 1]) insert(x[i + c], i + c, k, val, idx, &filled);
    }
    for (; i < V; i++)
        if (x[i] > val[k - 1]) insert(x[i], i, k, val, idx, &filled);
    for (int64_t next = 0; filled < k && next < V; next++) {
        int taken = 0;
        for (int j = 0; j < filled; j++) taken |= idx[j] == next;
        if (!taken) {
            idx[filled] = next;
            val[filled++] = x[next];
        }
    }
}

/* s = sum e^(x-m) and d = sum e^(x-m) (x-m) over row x, with m its largest value. x - m is clamped at -87:
 * e^-87 ~ 1.6e-38, which a sum that already holds e^0 = 1 cannot see (and -inf logits stay finite here). */
static void row_moments(const float *x, int64_t V, float m, float *s_out, float *d_out) {
    float s = 0.0f, d = 0.0f;
#pragma omp simd reduction(+ : s, d)
    for (int64_t i = 0; i < V; i++) {
        float z = x[i] - m;
        z = z < -87.0f ? -87.0f : z;
        float e = exp_nonpositive(z);
        s += e;
        d += e * z;
    }
    *s_out = s;
    *d_out = d;
}

static void row_stats(const float *x, int64_t V, int k, float *val, int64_t *idx, float *log_z, float *entropy) {
    row_top_k(x, V, k, val, idx);
    if (log_z == NULL) return;
    float s, d;
    row_moments(x, V, val[0], &s, &d);
    *log_z = val[0] + logf(s);
    *entropy = logf(s) - d / s;
}

/* x: (B, V) fp32, rows contiguous. val (B, k) fp32 and idx (B, k) int64 are written; log_z and entropy (B,) fp32
 * too unless NULL (then only the top-k is computed). */
void nmtkit_decode_stats_f32(const float *x, int64_t B, int64_t V, int k, float *val, int64_t *idx, float *log_z,
                             float *entropy) {
    for (int64_t b = 0; b < B; b++)
        row_stats(x + b * V, V, k, val + b * k, idx + b * k, log_z ? log_z + b : NULL, entropy ? entropy + b : NULL);
}

/* The same for bf16 logits (raw 16-bit patterns): each row is widened into `row` (V floats of scratch), exactly,
 * since a bf16 is the top half of an fp32. */
void nmtkit_decode_stats_bf16(const uint16_t *x, int64_t B, int64_t V, int k, float *val, int64_t *idx, float *log_z,
                              float *entropy, float *row) {
    for (int64_t b = 0; b < B; b++) {
        const uint16_t *src = x + b * V;
#pragma omp simd
        for (int64_t i = 0; i < V; i++) {
            uint32_t bits = (uint32_t)src[i] << 16;
            memcpy(&row[i], &bits, sizeof bits);
        }
        row_stats(row, V, k, val + b * k, idx + b * k, log_z ? log_z + b : NULL, entropy ? entropy + b : NULL);
    }
}

static inline float dot(const float *a, const float *b, int64_t D) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; d++) sum += a[d] * b[d];
    return sum;
}

static inline float widen(uint16_t h) { /* a bf16 is the top half of an fp32: exact */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float dot_bf16(const float *a, const uint16_t *b, int64_t D) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; d++) sum += a[d] * widen(b[d]);
    return sum;
}

static inline void add_scaled(float *out, float w, const float *x, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) out[d] += w * x[d];
}

static inline void add_scaled_bf16(float *out, float w, const uint16_t *x, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) out[d] += w * widen(x[d]);
}

/* q (B, H, D) fp32 contiguous; key and value (b, h, l, d) at l * sl + b * sb + h * sh + d (the same layout for
 * both), fp32, or bf16 when kv_bf16 (half the bytes to read; widened exactly as they are read); bias: NULL or an
 * additive mask, bias[b * bias_sb + l] (-inf hides a key; bias_sb = 0 shares one row); out (B, H, D) fp32. Returns 0,
 * or 1 when the scratch for the weights could not be allocated (or its size would overflow). A query whose every key
 * is hidden gets NaN, as softmax gives. */
int nmtkit_attend_one(const float *q, const void *k, const void *v, int kv_bf16, int64_t B, int64_t H, int64_t L,
                      int64_t D, int64_t sl, int64_t sb, int64_t sh, const float *bias, int64_t bias_sb, float scale,
                      float *out) {
    if (B <= 0 || H <= 0 || L <= 0 || (uint64_t)B * (uint64_t)H * (uint64_t)L > SIZE_MAX / sizeof(float)) return 1;
    float *w = malloc(sizeof(float) * (size_t)(B * H * L)); /* (B, H, L) scores, then unnormalised weights */
    if (w == NULL) return 1;
    /* Keys and values are walked in memory order: position by position in the position-major cache (each
     * position one contiguous (B, H, D) slab), sentence by sentence in the encoder memory's (B, H, S, D). */
    int by_position = sl > sh;
#define AT(b, h, l) ((l) * sl + (b) * sb + (h) * sh) /* an element's offset in keys and values */
#define SCORE(b, h, l)                                                                                            \
    w[((b) * H + (h)) * L + (l)] =                                                                                \
        (kv_bf16 ? dot_bf16(q + ((b) * H + (h)) * D, (const uint16_t *)k + AT(b, h, l), D)                     \
                 : dot(q + ((b) * H + (h)) * D, (const float *)k + AT(b, h, l), D)) *                          \
        scale
#define ADD_VALUE(b, h, l)                                                                                        \
    do {                                                                                                          \
        float *o = out + ((b) * H + (h)) * D, weight = w[((b) * H + (h)) * L + (l)];                              \
        if (kv_bf16)                                                                                              \
            add_scaled_bf16(o, weight, (const uint16_t *)v + AT(b, h, l), D);                                  \
        else                                                                                                      \
            add_scaled(o, weight, (const float *)v + AT(b, h, l), D);                                          \
    } while (0)
#define IN_MEMORY_ORDER(STEP)                                                                                     \
    if (by_position) {                                                                                            \
        for (int64_t l = 0; l < L; l++)                                                                           \
            for (int64_t b = 0; b < B; b++)                                                                       \
                for (int64_t h = 0; h < H; h++) STEP(b, h, l);                                                    \
    } else {                                                                                                      \
        for (int64_t b = 0; b < B; b++)                                                                           \
            for (int64_t h = 0; h < H; h++)                                                                       \
                for (int64_t l = 0; l < L; l++) STEP(b, h, l);                                                    \
    }
    IN_MEMORY_ORDER(SCORE);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float *row = w + (b * H + h) * L, m = -INFINITY;
            if (bias)
                for (int64_t l = 0; l < L; l++) row[l] += bias[b * bias_sb + l];
            for (int64_t l = 0; l < L; l++) m = row[l] > m ? row[l] : m;
#pragma omp simd
            for (int64_t l = 0; l < L; l++) {
                float z = row[l] - m; /* -inf for a hidden key: its weight is exactly 0 */
                row[l] = z < -87.0f ? 0.0f : exp_nonpositive(z);
            }
            memset(out + (b * H + h) * D, 0, sizeof(float) * (size_t)D);
        }
    IN_MEMORY_ORDER(ADD_VALUE);
    for (int64_t bh = 0; bh < B * H; bh++) { /* the softmax's division, once per output */
        float sum = 0.0f;
        for (int64_t l = 0; l < L; l++) sum += w[bh * L + l];
        float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) out[bh * D + d] *= inv;
    }
#undef AT
#undef SCORE
#undef ADD_VALUE
#undef IN_MEMORY_ORDER
    free(w);
    return 0;
}

static inline uint16_t narrow(float f) { /* fp32 -> bf16, rounded to nearest even, as torch rounds (finite values) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* One row of label-smoothed cross-entropy: x (V fp32 logits) is overwritten with e^(x - m), m its largest logit; *inv_s
 * gets 1 / sum e^(x - m). The loss is ln Z - (1 - eps) x[t] - eps mean(x), with ln Z = m + ln s: the cross-entropy
 * against (1 - eps) on the target plus eps spread evenly over the V pieces. */
static float xent_row(float *x, int64_t V, int64_t t, float eps, float *inv_s) {
    float m = -INFINITY, sum = 0.0f, s = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : sum)
    for (int64_t i = 0; i < V; i++) {
        m = x[i] > m ? x[i] : m;
        sum += x[i];
    }
    float target = x[t];
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < V; i++) {
        float z = x[i] - m;
        float e = exp_nonpositive(z < -87.0f ? -87.0f : z);
        x[i] = e;
        s += e;
    }
    *inv_s = 1.0f / s;
    return m + logf(s) - (1.0f - eps) * target - eps * (sum / (float)V);
}

/* x (n, V) fp32 logits, rows contiguous; targets (n,) in [0, V), or negative for a row to ignore (padding). Writes d
 * loss / d x = softmax(x) - (1 - eps) onehot(t) - eps / V into grad (n, V), which may be x itself; an ignored row's
 * gradient is 0. Returns the summed loss of the rows not ignored. */
double nmtkit_xent_chunk_f32(const float *x, int64_t n, int64_t V, const int64_t *targets, float eps, float *grad) {
    double total = 0.0;
    for (int64_t r = 0; r < n; r++) {
        float *g = grad + r * V, inv_s;
        if (targets[r] < 0) {
            memset(g, 0, sizeof(float) * (size_t)V);
            continue;
        }
        if (g != x + r * V) memcpy(g, x + r * V, sizeof(float) * (size_t)V);
        total += xent_row(g, V, targets[r], eps, &inv_s);
#pragma omp simd
        for (int64_t i = 0; i < V; i++) g[i] = g[i] * inv_s - eps / (float)V;
        g[targets[r]] -= 1.0f - eps;
    }
    return total;
}

/* The same for bf16 logits and a bf16 gradient (raw 16-bit patterns): each row is widened into `row` (V floats of
 * scratch), exactly, and the gradient is computed in fp32 and rounded once. */
double nmtkit_xent_chunk_bf16(const uint16_t *x, int64_t n, int64_t V, const int64_t *targets, float eps, uint16_t *grad,
                              float *row) {
    double total = 0.0;
    for (int64_t r = 0; r < n; r++) {
        uint16_t *g = grad + r * V;
        int64_t t = targets[r];
        float inv_s;
        if (t < 0) {
            memset(g, 0, sizeof(uint16_t) * (size_t)V);
            continue;
        }
#pragma omp simd
        for (int64_t i = 0; i < V; i++) row[i] = widen(x[r * V + i]);
        total += xent_row(row, V, t, eps, &inv_s);
#pragma omp simd
        for (int64_t i = 0; i < V; i++) g[i] = narrow(row[i] * inv_s - eps / (float)V);
        g[t] = narrow(row[t] * inv_s - eps / (float)V - (1.0f - eps));
    }
    return total;
}
