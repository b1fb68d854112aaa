/*
 * kvf-llama: a llama.cpp engine that reuses remote KV through the KVFetcher daemon.
 *
 * For a prompt (token ids or text) it asks the daemon how much of the prompt's prefix is
 * stored (kvf lookup). On a hit it fetches that KV into host memory, loads it into llama.cpp
 * as sequence 0's state and decodes only the rest of the prompt; on a miss (or any failure of
 * the daemon, the store or the KV, each logged with its reason) it prefills the whole prompt
 * and, unless --no-save, hands the KV to the daemon to store. Then it generates greedily.
 *
 * Output on stdout, one `key=value` per line (tests parse it): source (fetch|prefill),
 * reused (tokens of KV loaded), prompt, ttft_ms (request start to the first token's logits),
 * saved_chunks, gen (token ids). Logs go to stderr, prefixed "kvf-llama:".
 *
 * GPU mode (--kv-gpu N, or env KVF_GPU=N; needs a llama.cpp built with -DGGML_CUDA=ON and the
 * NVIDIA driver, opened with dlopen so the CPU build never needs it): every layer and the KV
 * cache live on GPU N, and a hit is fetched into GPU N's memory over CUDA IPC (the daemon
 * restores it there); each layer is copied to page-locked host memory on a CUDA stream that
 * waits for that layer (kvf_fetch_stream_wait_layer), then llama_state_seq_set_data uploads
 * the state into llama.cpp's CUDA KV cache. The device -> host -> device hop is there because
 * llama.h has no call that takes sequence KV in device memory (set_data takes host bytes; its
 * LLAMA_STATE_SEQ_FLAGS_ON_DEVICE flag only reloads llama.cpp's own device snapshots), and
 * writing ggml's cache tensors behind llama.cpp's back would bypass its cell bookkeeping.
 *
 * Other modes: --selftest (llama.cpp alone: KV <-> state mapping round trips and prefix
 * reuse), --split P (local reference: prefill [0,P) then the rest), --sample N (prints N
 * token ids sampled from BOS with a seed, to make test prompts). See docs/ENGINES.md.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_drv.h"
#include "engine.h"
#include "kv_state.h"
#include "remote.h"
#include "kvfetcher.h"

#define LOG(...)                                                                                \
    do {                                                                                        \
        fprintf(stderr, "kvf-llama: " __VA_ARGS__);                                             \
        fputc('\n', stderr);                                                                    \
    } while (0)

/* The daemon's default socket (daemon/src/config.rs DEFAULT_SOCKET). */
#define DEFAULT_SOCKET "/run/kvfetcher/kvfetcher.sock"

typedef struct args {
    const char *model;
    const char *model_id;
    const char *socket;
    const char *tokens;
    const char *tokens_file;
    const char *prompt;
    const char *prompt_file;
    const char *prefix_kv;
    const char *write_f32;
    const char *logits_out;
    const char *kv_out;
    uint32_t gen;
    int threads;
    int flash_attn;
    int kv_f32;
    int no_remote;
    int no_save;
    int selftest;
    int chat;        /* --chat: the prompt is one user turn in the model's chat template */
    int print_prompt;
    int print_text;  /* --text: print the generated text (text=, escaped) */
    int stop_eog;    /* --stop-eog: generation ends at an end-of-generation token */
    int info;        /* --info: print the model's KV geometry and metadata, then exit */
    long max_tokens; /* --max-tokens N: the prompt's first N tokens only */
    long ctx;        /* --ctx N: context size (0: the model's training context) */
    long score;      /* --score P: load --prefix-kv for tokens [0,P), decode the rest, all logits */
    int gpu; /* --kv-gpu N: CUDA ordinal, -1: CPU */
    long split;
    long sample;
    unsigned long long seed;
    double temp;
} args;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void usage(void) {
    fprintf(stderr,
            "usage: kvf-llama --model FILE.gguf PROMPT [--gen N] [--socket PATH] [--model-id ID]\n"
            "                 [--no-remote] [--no-save] [--threads N] [--flash-attn] [--kv-f32]\n"
            "                 [--ctx N] [--stop-eog] [--text] [--print-prompt]\n"
            "                 [--logits-out F] [--kv-out F]\n"
            "                 [--kv-gpu N]  (GPU N: all layers + KV cache, fetch over CUDA IPC;\n"
            "                                env KVF_GPU=N does the same)\n"
            "       kvf-llama --model FILE.gguf PROMPT --selftest [--gen N]\n"
            "       kvf-llama --model FILE.gguf PROMPT --split P [--gen N]\n"
            "       kvf-llama --model FILE.gguf PROMPT --score P --prefix-kv F --logits-out F [--gen N]\n"
            "       kvf-llama --model FILE.gguf --sample N [--seed S] [--temp T]\n"
            "       kvf-llama --model FILE.gguf --info\n"
            "       kvf-llama --model FILE.gguf --write-f32 OUT.gguf   (weights dequantized to f32)\n"
            "PROMPT: --tokens 'ID ID ..' | --tokens-file F | --prompt TEXT | --prompt-file F,\n"
            "        optionally --chat (text as one user turn in the model's chat template) and\n"
            "        --max-tokens N (keep the first N tokens).\n"
            "--score P: loads the KV of tokens [0,P) from F (the host layout: per layer K then V,\n"
            "        [P, kv_heads, head_dim] in the cache's type), decodes tokens [P,n) and writes\n"
            "        the logits of every one of them (f32, (n-P) x n_vocab), then generates.\n"
            "The default --model-id is the model file's content hash plus the cache settings.\n");
}

static int parse_u(const char *s, long lo, long hi, long *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || *end || v < lo || v > hi) {
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, args *a) {
    memset(a, 0, sizeof(*a));
    a->gen = 16;
    a->threads = 1;
    /* Flash attention stays off by default: measured on stories260K, llama.cpp's CPU
     * flash-attention path moves logits by ~4e-2 and changes greedy tokens against the llama2.c
     * reference (off: 4e-5, same tokens); it prefills ~4x faster (--flash-attn). */
    a->flash_attn = 0;
    a->split = -1;
    a->sample = -1;
    a->seed = 42;
    a->temp = 1.0;
    a->gpu = -1;
    if (getenv("KVF_GPU") && *getenv("KVF_GPU")) {
        long g = 0;
        if (parse_u(getenv("KVF_GPU"), 0, 1023, &g)) {
            LOG("bad KVF_GPU %s", getenv("KVF_GPU"));
            return -1;
        }
        a->gpu = (int)g;
    }
    a->socket = getenv("KVFETCHER_SOCKET") ? getenv("KVFETCHER_SOCKET") : DEFAULT_SOCKET;
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long n = 0;
#define NEED_V()                                                                                \
    do {                                                                                        \
        if (!v) {                                                                               \
            LOG("%s needs a value", k);                                                         \
            return -1;                                                                          \
        }                                                                                       \
        i++;                                                                                    \
    } while (0)
        if (!strcmp(k, "--model")) {
            NEED_V();
            a->model = v;
        } else if (!strcmp(k, "--model-id")) {
            NEED_V();
            a->model_id = v;
        } else if (!strcmp(k, "--socket")) {
            NEED_V();
            a->socket = v;
        } else if (!strcmp(k, "--tokens")) {
            NEED_V();
            a->tokens = v;
        } else if (!strcmp(k, "--tokens-file")) {
            NEED_V();
            a->tokens_file = v;
        } else if (!strcmp(k, "--prompt")) {
            NEED_V();
            a->prompt = v;
        } else if (!strcmp(k, "--prompt-file")) {
            NEED_V();
            a->prompt_file = v;
        } else if (!strcmp(k, "--prefix-kv")) {
            NEED_V();
            a->prefix_kv = v;
        } else if (!strcmp(k, "--write-f32")) {
            NEED_V();
            a->write_f32 = v;
        } else if (!strcmp(k, "--max-tokens")) {
            NEED_V();
            if (parse_u(v, 1, 1 << 24, &a->max_tokens)) {
                LOG("bad --max-tokens %s", v);
                return -1;
            }
        } else if (!strcmp(k, "--ctx")) {
            NEED_V();
            if (parse_u(v, 16, 1 << 24, &a->ctx)) {
                LOG("bad --ctx %s", v);
                return -1;
            }
        } else if (!strcmp(k, "--score")) {
            NEED_V();
            if (parse_u(v, 1, 1 << 24, &a->score)) {
                LOG("bad --score %s", v);
                return -1;
            }
        } else if (!strcmp(k, "--chat")) {
            a->chat = 1;
        } else if (!strcmp(k, "--print-prompt")) {
            a->print_prompt = 1;
        } else if (!strcmp(k, "--text")) {
            a->print_text = 1;
        } else if (!strcmp(k, "--stop-eog")) {
            a->stop_eog = 1;
        } else if (!strcmp(k, "--info")) {
            a->info = 1;
        } else if (!strcmp(k, "--logits-out")) {
            NEED_V();
            a->logits_out = v;
        } else if (!strcmp(k, "--kv-out")) {
            NEED_V();
            a->kv_out = v;
        } else if (!strcmp(k, "--gen")) {
            NEED_V();
            if (parse_u(v, 1, 1 << 20, &n)) {
                LOG("bad --gen %s", v);
                return -1;
            }
            a->gen = (uint32_t)n;
        } else if (!strcmp(k, "--threads")) {
            NEED_V();
            if (parse_u(v, 1, 256, &n)) {
                LOG("bad --threads %s", v);
                return -1;
            }
            a->threads = (int)n;
        } else if (!strcmp(k, "--split")) {
            NEED_V();
            if (parse_u(v, 0, 1 << 24, &a->split)) {
                LOG("bad --split %s", v);
                return -1;
            }
        } else if (!strcmp(k, "--sample")) {
            NEED_V();
            if (parse_u(v, 1, 1 << 24, &a->sample)) {
                LOG("bad --sample %s", v);
                return -1;
            }
        } else if (!strcmp(k, "--seed")) {
            NEED_V();
            if (parse_u(v, 0, 0x7fffffffL, &n)) {
                LOG("bad --seed %s", v);
                return -1;
            }
            a->seed = (unsigned long long)n;
        } else if (!strcmp(k, "--temp")) {
            NEED_V();
            char *end = NULL;
            a->temp = strtod(v, &end);
            if (!end || *end || !(a->temp > 0.0) || !isfinite(a->temp)) {
                LOG("bad --temp %s", v);
                return -1;
            }
        } else if (!strcmp(k, "--kv-gpu")) {
            NEED_V();
            if (parse_u(v, 0, 1023, &n)) {
                LOG("bad --kv-gpu %s", v);
                return -1;
            }
            a->gpu = (int)n;
        } else if (!strcmp(k, "--flash-attn")) {
            a->flash_attn = 1;
        } else if (!strcmp(k, "--kv-f32")) {
            a->kv_f32 = 1;
        } else if (!strcmp(k, "--no-remote")) {
            a->no_remote = 1;
        } else if (!strcmp(k, "--no-save")) {
            a->no_save = 1;
        } else if (!strcmp(k, "--selftest")) {
            a->selftest = 1;
        } else if (!strcmp(k, "--help") || !strcmp(k, "-h")) {
            usage();
            exit(0);
        } else {
            LOG("unknown argument %s", k);
            return -1;
        }
#undef NEED_V
    }
    if (!a->model) {
        LOG("--model is required");
        return -1;
    }
    if (a->sample < 0 && !a->info && !a->write_f32 &&
        !!a->tokens + !!a->tokens_file + !!a->prompt + !!a->prompt_file != 1) {
        LOG("give exactly one of --tokens, --tokens-file, --prompt, --prompt-file");
        return -1;
    }
    if (a->chat && !a->prompt && !a->prompt_file) {
        LOG("--chat applies to a text prompt (--prompt or --prompt-file)");
        return -1;
    }
    if (a->score > 0 && (!a->prefix_kv || !a->logits_out)) {
        LOG("--score needs --prefix-kv and --logits-out");
        return -1;
    }
    if (!a->model_id && !a->info && !a->write_f32 && a->sample < 0) {
        /* The daemon's key namespace: the model file's content (so two files of one name never
         * share KV) and the settings that change the KV llama.cpp computes (cache type, flash
         * attention, and the backend: CUDA kernels round differently from the CPU's). */
        static char id[512];
        char hash[128];
        size_t len = 0;
        const kvf_error rc = kvf_model_id_from_file(a->model, hash, sizeof hash, &len);
        if (rc != KVF_OK || len >= sizeof hash) {
            char detail[256] = "";
            kvf_last_error_detail(detail, sizeof detail);
            LOG("cannot identify the model: %s", detail);
            return -1;
        }
        snprintf(id, sizeof id, "%s;kv=%s;fa=%d%s", hash, a->kv_f32 ? "f32" : "f16", a->flash_attn,
                 a->gpu >= 0 ? ";dev=cuda" : "");
        a->model_id = id;
    }
    return 0;
}

/* Parses whitespace- or comma-separated token ids. Returns the count or -1. */
static long parse_tokens(const char *text, int32_t **out, int32_t n_vocab) {
    size_t cap = 64, n = 0;
    int32_t *v = malloc(cap * sizeof(int32_t));
    const char *p = text;
    if (!v) {
        return -1;
    }
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\t' || *p == '\r') {
            p++;
        }
        if (!*p) {
            break;
        }
        char *end = NULL;
        errno = 0;
        long id = strtol(p, &end, 10);
        if (errno || end == p || id < 0 || id >= n_vocab) {
            LOG("bad token id near '%.16s' (vocabulary has %d tokens)", p, n_vocab);
            free(v);
            return -1;
        }
        if (n == cap) {
            int32_t *w = realloc(v, (cap *= 2) * sizeof(int32_t));
            if (!w) {
                free(v);
                return -1;
            }
            v = w;
        }
        v[n++] = (int32_t)id;
        p = end;
    }
    *out = v;
    return (long)n;
}

static char *read_file_len(const char *path, size_t *out_len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        LOG("%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0, got;
    char *buf = malloc(cap + 1);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *b = realloc(buf, (cap *= 2) + 1);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
        }
    }
    fclose(f);
    if (buf) {
        buf[n] = 0;
        *out_len = n;
    }
    return buf;
}

static char *read_file(const char *path) {
    size_t len = 0;
    return read_file_len(path, &len);
}

static int write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len) {
        LOG("%s: %s", path, strerror(errno));
        if (f) {
            fclose(f);
        }
        return -1;
    }
    return fclose(f) == 0 ? 0 : -1;
}

/* Writes a host KV buffer as safetensors (layers.{i}.key / layers.{i}.value,
 * [tokens, kv_heads, head_dim]), the format of `kvfetcher-bench kv capture`. */
static int write_safetensors(const char *path, const kvs_geometry *g, uint32_t tokens,
                             const uint8_t *host, size_t host_len) {
    const char *dt = g->ggml_type == KVS_GGML_TYPE_F32 ? "F32" : g->ggml_type == KVS_GGML_TYPE_F16 ? "F16" : "BF16";
    const size_t one = host_len / (2 * (size_t)g->n_layer);
    size_t cap = 256 + (size_t)g->n_layer * 256, len = 0;
    char *h = malloc(cap);
    if (!h) {
        return -1;
    }
    len += (size_t)snprintf(h + len, cap - len, "{");
    for (uint32_t l = 0; l < g->n_layer; l++) {
        for (int kv = 0; kv < 2; kv++) {
            const size_t off = ((size_t)l * 2 + kv) * one;
            len += (size_t)snprintf(h + len, cap - len,
                                    "%s\"layers.%u.%s\":{\"dtype\":\"%s\",\"shape\":[%u,%u,%u],"
                                    "\"data_offsets\":[%zu,%zu]}",
                                    len > 1 ? "," : "", l, kv ? "value" : "key", dt, tokens,
                                    g->kv_heads, g->head_dim, off, off + one);
        }
    }
    len += (size_t)snprintf(h + len, cap - len, "}");
    while (len % 8) {
        h[len++] = ' ';
    }
    FILE *f = fopen(path, "wb");
    uint64_t hl = len;
    int ok = f && fwrite(&hl, 8, 1, f) == 1 && fwrite(h, 1, len, f) == len &&
             fwrite(host, 1, host_len, f) == host_len;
    free(h);
    if (f && fclose(f) != 0) {
        ok = 0;
    }
    if (!ok) {
        LOG("%s: cannot write", path);
    }
    return ok ? 0 : -1;
}

static void print_tokens(const char *key, const int32_t *t, uint32_t n) {
    printf("%s=", key);
    for (uint32_t i = 0; i < n; i++) {
        printf(i ? " %d" : "%d", t[i]);
    }
    printf("\n");
}

/* Prints gen= (token ids) and, with --text, text= (newlines and backslashes escaped). */
static void print_generated(const eng *e, const args *a, const int32_t *gen, uint32_t n) {
    print_tokens("gen", gen, n);
    if (!a->print_text) {
        return;
    }
    char *text = eng_detokenize(e, gen, n);
    printf("text=");
    for (const char *c = text ? text : ""; *c; c++) {
        if (*c == '\n') {
            fputs("\\n", stdout);
        } else if (*c == '\\') {
            fputs("\\\\", stdout);
        } else {
            putchar(*c);
        }
    }
    printf("\n");
    free(text);
}

/* --sample: N token ids sampled from the vocabulary's BOS at temperature T with a seeded xorshift64*. */
static int run_sample(eng *e, const args *a) {
    uint64_t s = a->seed * 0x9E3779B97F4A7C15ull + 1;
    float *logits = malloc((size_t)e->n_vocab * sizeof(float));
    double *p = malloc((size_t)e->n_vocab * sizeof(double));
    int32_t tok = eng_bos(e);
    int rc = logits && p ? 0 : -1;
    printf("%d", tok);
    for (long i = 1; i < a->sample && rc == 0; i++) {
        if (eng_decode(e, &tok, 1, (uint32_t)(i - 1), logits) != 0) {
            rc = -1;
            break;
        }
        double mx = logits[0], sum = 0;
        for (int32_t j = 1; j < e->n_vocab; j++) {
            mx = logits[j] > mx ? logits[j] : mx;
        }
        for (int32_t j = 0; j < e->n_vocab; j++) {
            sum += p[j] = exp((logits[j] - mx) / a->temp);
        }
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        double u = (double)((s * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0 * sum;
        tok = e->n_vocab - 1;
        for (int32_t j = 0; j < e->n_vocab; j++) {
            if ((u -= p[j]) < 0) {
                tok = j;
                break;
            }
        }
        printf(" %d", tok);
    }
    printf("\n");
    free(logits);
    free(p);
    return rc;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        m = d > m ? d : m;
    }
    return m;
}

/* Full prefill of toks, then n_gen greedy tokens. */
static int reference(eng *e, const int32_t *toks, uint32_t n, uint32_t n_gen, int32_t *gen,
                     float *steps) {
    float *logits = malloc((size_t)e->n_vocab * sizeof(float));
    int rc = logits ? 0 : -1;
    eng_reset(e);
    rc = rc || eng_decode(e, toks, n, 0, logits) ||
         eng_generate(e, logits, n, n_gen, 0, gen, steps) != (long)n_gen;
    free(logits);
    return rc ? -1 : 0;
}

/*
 * --selftest: proves the KV <-> llama.cpp mapping with llama.cpp alone.
 * 1. get -> set -> get of the whole prompt's KV returns the same bytes, and generation after
 *    the restored state equals generation after the prefill, logits bit for bit;
 * 2. for several prefix lengths P: load the first P tokens' KV (cut from the full prefill's
 *    KV, as a fetch of a stored prefix would), decode the rest, generate: the tokens must equal
 *    those after a full prefill (the logits' largest difference is reported);
 * 3. with flash attention, llama.cpp's CPU kernels are not batch-invariant (a prefill split at
 *    P differs from a full prefill, llama.cpp alone), so 2. is reported, not required; what is
 *    required is the mapping's own invariant: loading the KV that a prefill of [0,P) produced
 *    and decoding the rest equals prefilling [0,P) and decoding the rest, logits bit for bit.
 */
static int run_selftest(eng *e, const int32_t *toks, uint32_t n, uint32_t n_gen, int flash_attn) {
    const size_t nv = (size_t)e->n_vocab;
    int32_t *gen_a = malloc(n_gen * sizeof(int32_t)), *gen_b = malloc(n_gen * sizeof(int32_t));
    int32_t *gen_a_split = malloc(n_gen * sizeof(int32_t));
    float *st_split = malloc(n_gen * nv * sizeof(float));
    float *st_a = malloc(n_gen * nv * sizeof(float)), *st_b = malloc(n_gen * nv * sizeof(float));
    float *logits = malloc(nv * sizeof(float));
    uint8_t *host = NULL, *host2 = NULL, *pre = NULL;
    size_t len = 0, len2 = 0;
    uint32_t t = 0, t2 = 0;
    char err[256] = "";
    int fails = 0;
    if (!gen_a || !gen_b || !gen_a_split || !st_split || !st_a || !st_b || !logits || n < 2) {
        LOG("selftest needs at least 2 prompt tokens");
        fails++;
        goto out;
    }
    if (reference(e, toks, n, n_gen, gen_a, st_a) != 0) {
        LOG("selftest: reference decode failed");
        fails++;
        goto out;
    }
    /* 1. round trip of the whole prompt */
    eng_reset(e);
    if (eng_decode(e, toks, n, 0, logits) || eng_get_kv(e, &host, &len, &t, err, sizeof err) ||
        t != n) {
        LOG("selftest: get kv failed: %s (tokens %u)", err, t);
        fails++;
        goto out;
    }
    eng_reset(e);
    if (eng_set_kv(e, host, len, t, err, sizeof err) ||
        eng_get_kv(e, &host2, &len2, &t2, err, sizeof err)) {
        LOG("selftest: set kv failed: %s", err);
        fails++;
        goto out;
    }
    const int same_kv = t2 == t && len2 == len && memcmp(host, host2, len) == 0;
    memcpy(logits, st_a, nv * sizeof(float)); /* the prefill's last logits */
    const int gen_ok = eng_generate(e, logits, n, n_gen, 0, gen_b, st_b) == (long)n_gen;
    const int same_gen = gen_ok && memcmp(gen_a, gen_b, n_gen * sizeof(int32_t)) == 0;
    const int same_logits = gen_ok && memcmp(st_a, st_b, n_gen * nv * sizeof(float)) == 0;
    printf("roundtrip_kv_identical=%d\nroundtrip_gen_identical=%d\nroundtrip_logits_identical=%d\n",
           same_kv, same_gen, same_logits);
    fails += !same_kv + !same_gen + !same_logits;

    /* 2. prefix reuse at several lengths */
    const uint32_t cuts[] = {1, n / 3, n / 2, n - 1};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        const uint32_t p = cuts[c] ? cuts[c] : 1;
        kvs_geometry g = e->geo;
        const size_t plen = kvs_host_size(&g, p);
        free(pre);
        pre = malloc(plen);
        if (!pre || kvs_host_prefix(&g, t, host, len, p, pre, plen) != KVS_OK) {
            fails++;
            continue;
        }
        eng_reset(e);
        if (eng_set_kv(e, pre, plen, p, err, sizeof err) ||
            eng_decode(e, toks + p, n - p, p, logits) ||
            eng_generate(e, logits, n, n_gen, 0, gen_b, st_b) != (long)n_gen) {
            LOG("selftest: prefix %u failed: %s", p, err);
            fails++;
            continue;
        }
        const int tok_same = memcmp(gen_a, gen_b, n_gen * sizeof(int32_t)) == 0;
        printf("prefix=%u gen_identical=%d max_logit_diff=%.3g%s\n", p, tok_same,
               max_abs_diff(st_a, st_b, n_gen * nv), flash_attn ? " (reported)" : "");
        fails += !tok_same && !flash_attn;
        if (!flash_attn) {
            continue;
        }
        /* 3. the KV of a prefill of exactly [0,p), loaded, against that split prefill. */
        uint8_t *own = NULL;
        size_t own_len = 0;
        uint32_t own_t = 0;
        long got_split = -1, got_load = -1;
        eng_reset(e);
        if (eng_decode(e, toks, p, 0, NULL) == 0 &&
            eng_get_kv(e, &own, &own_len, &own_t, err, sizeof err) == 0 &&
            eng_decode(e, toks + p, n - p, p, logits) == 0) {
            got_split = eng_generate(e, logits, n, n_gen, 0, gen_a_split, st_split);
        }
        eng_reset(e);
        if (own && eng_set_kv(e, own, own_len, own_t, err, sizeof err) == 0 &&
            eng_decode(e, toks + p, n - p, p, logits) == 0) {
            got_load = eng_generate(e, logits, n, n_gen, 0, gen_b, st_b);
        }
        free(own);
        const int exact = got_split == (long)n_gen && got_load == (long)n_gen &&
                          memcmp(gen_a_split, gen_b, n_gen * sizeof(int32_t)) == 0 &&
                          memcmp(st_split, st_b, n_gen * nv * sizeof(float)) == 0;
        printf("prefix=%u split_identical=%d\n", p, exact);
        fails += !exact;
    }
    print_tokens("gen", gen_a, n_gen);
out:
    printf("selftest=%s\n", fails ? "fail" : "ok");
    free(gen_a_split);
    free(st_split);
    free(gen_a);
    free(gen_b);
    free(st_a);
    free(st_b);
    free(logits);
    free(host);
    free(host2);
    free(pre);
    return fails ? -1 : 0;
}

/* The engine's request path: remote prefix reuse, else prefill (and save), then generation. */
static int run_request(eng *e, const args *a, const int32_t *toks, uint32_t n) {
    const size_t nv = (size_t)e->n_vocab;
    float *logits = malloc(nv * sizeof(float));
    int32_t *gen = malloc(a->gen * sizeof(int32_t));
    float *steps = a->logits_out ? malloc(a->gen * nv * sizeof(float)) : NULL;
    remote *r = NULL;
    remote_fetch f = {0};
    cuda_drv *cu = NULL;
    char err[512] = "";
    uint32_t reused = 0, avail = 0, chunks = 0;
    int rc = -1, saved = 0;
    if (!logits || !gen || (a->logits_out && !steps)) {
        goto out;
    }
    eng_reset(e);
    /* GPU mode: the driver and a stream are set up once per engine, before any request. */
    if (a->gpu >= 0 && !a->no_remote && !(cu = cuda_open(a->gpu, err, sizeof err))) {
        LOG("gpu %d unavailable for fetches (%s): prefilling without remote reuse", a->gpu, err);
    }
    const double t0 = now_ms();
    double t_fetch = t0;
    /*
     * The whole prompt is looked up, so a repeated prompt also matches its stored partial last
     * chunk. The prompt's last token is always decoded (its logits pick the first new token): on
     * a full hit its KV is dropped again and recomputed.
     */
    if (a->no_remote) {
        LOG("remote reuse off (--no-remote): prefilling %u tokens", n);
    } else if (a->gpu >= 0 && !cu) {
        /* logged above */
    } else if (!(r = remote_connect(a->socket, err, sizeof err))) {
        LOG("daemon unavailable (%s): falling back to prefill", err);
    } else if (remote_lookup(r, a->model_id, toks, n, &avail, err, sizeof err)) {
        LOG("lookup failed (%s): falling back to prefill", err);
    } else if (avail == 0) {
        LOG("prefix not in the store: falling back to prefill");
    } else if (remote_fetch_kv(r, a->model_id, toks, n, &e->geo, cu, a->gpu, &f, err,
                               sizeof err)) {
        LOG("fetch of %u tokens failed (%s): falling back to prefill", avail, err);
    } else if (f.tokens == 0 || f.tokens > n) {
        LOG("daemon returned %u tokens for a %u-token prompt: falling back to prefill", f.tokens, n);
    } else if (eng_set_kv_layers(e, f.layers, f.layer_len, f.tokens, err, sizeof err)) {
        LOG("loading fetched kv failed (%s): falling back to prefill", err);
    } else if (f.tokens == n && eng_truncate(e, n - 1) != 0) {
        LOG("dropping the last token's kv failed: falling back to prefill");
    } else {
        reused = f.tokens == n ? n - 1 : f.tokens;
        t_fetch = now_ms();
        LOG("reused %u of %u prompt tokens from the store (%u fetched into %s, %.2f ms)", reused,
            n, f.tokens, cu ? "gpu memory" : "host memory", t_fetch - t0);
    }
    remote_fetch_free(&f);
    if (reused == 0) {
        eng_reset(e);
        t_fetch = now_ms();
    }
    if (eng_decode(e, toks + reused, n - reused, reused, logits) != 0) {
        LOG("decode failed");
        goto out;
    }
    const double t_first = now_ms();
    /* New KV beyond what the store had: hand the prompt's KV to the daemon (after the first
     * token, off its latency). */
    if (reused + 1 < n && r && !a->no_save) {
        uint8_t *host = NULL;
        size_t len = 0;
        uint32_t t = 0;
        if (eng_get_kv(e, &host, &len, &t, err, sizeof err)) {
            LOG("reading kv for save failed: %s", err);
        } else if (remote_save_kv(r, a->model_id, toks, t, &e->geo, host, len, &chunks, err,
                                  sizeof err)) {
            LOG("save failed (%s): continuing without it", err);
        } else {
            saved = 1;
            LOG("saved %u tokens as %u chunks", t, chunks);
        }
        free(host);
    }
    if (a->kv_out) {
        uint8_t *host = NULL;
        size_t len = 0;
        uint32_t t = 0;
        if (eng_get_kv(e, &host, &len, &t, err, sizeof err) ||
            write_safetensors(a->kv_out, &e->geo, t, host, len)) {
            LOG("--kv-out failed: %s", err);
            free(host);
            goto out;
        }
        free(host);
    }
    const long n_out = eng_generate(e, logits, n, a->gen, a->stop_eog, gen, steps);
    if (n_out < 0) {
        LOG("generation failed");
        goto out;
    }
    printf("source=%s\nreused=%u\nprompt=%u\n", reused ? "fetch" : "prefill", reused, n);
    printf("fetch_memory=%s\n", reused == 0 ? "none" : cu ? "gpu" : "host");
    printf("ttft_ms=%.3f\nload_ms=%.3f\nsaved_chunks=%u\n", t_first - t0, t_fetch - t0,
           saved ? chunks : 0);
    print_generated(e, a, gen, (uint32_t)n_out);
    if (a->logits_out && write_file(a->logits_out, steps, (size_t)n_out * nv * sizeof(float))) {
        goto out;
    }
    rc = 0;
out:
    remote_close(r);
    cuda_close(cu);
    free(logits);
    free(gen);
    free(steps);
    return rc;
}

/*
 * --score P: the engine half of `kvfetcher-bench fidelity`. Loads the KV of tokens [0,P) from
 * --prefix-kv (exact or decoded, as a fetch would hand it over), decodes tokens [P,n) in one
 * pass with every position's logits written to --logits-out, then generates --gen tokens
 * greedily. Run once with the exact KV and once per codec setting, only the KV differs.
 */
static int run_score(eng *e, const args *a, const int32_t *toks, uint32_t n) {
    const uint32_t p = (uint32_t)a->score;
    const size_t nv = (size_t)e->n_vocab;
    if (p >= n) {
        LOG("--score %u must be below the prompt length %u", p, n);
        return -1;
    }
    const size_t want = kvs_host_size(&e->geo, p);
    float *all = malloc((size_t)(n - p) * nv * sizeof(float));
    float *logits = malloc(nv * sizeof(float));
    int32_t *gen = malloc(((size_t)a->gen + 1) * sizeof(int32_t));
    char *kv = NULL;
    char err[256] = "";
    size_t kv_len = 0;
    int rc = -1;
    if (!all || !logits || !gen) {
        LOG("out of memory");
        goto out;
    }
    if (!(kv = read_file_len(a->prefix_kv, &kv_len))) {
        goto out;
    }
    if (kv_len != want) {
        LOG("%s holds %zu bytes; %u tokens of this model's KV (%s) are %zu", a->prefix_kv, kv_len,
            p, a->kv_f32 ? "f32" : "f16", want);
        goto out;
    }
    eng_reset(e);
    if (eng_set_kv(e, (const uint8_t *)kv, kv_len, p, err, sizeof err)) {
        LOG("loading %s: %s", a->prefix_kv, err);
        goto out;
    }
    if (eng_decode_all(e, toks + p, n - p, p, all) != 0) {
        LOG("decode failed");
        goto out;
    }
    if (write_file(a->logits_out, all, (size_t)(n - p) * nv * sizeof(float))) {
        goto out;
    }
    memcpy(logits, all + (size_t)(n - p - 1) * nv, nv * sizeof(float));
    const long n_out = eng_generate(e, logits, n, a->gen, a->stop_eog, gen, NULL);
    if (n_out < 0) {
        LOG("generation failed");
        goto out;
    }
    printf("positions=%u\n", n - p);
    print_generated(e, a, gen, (uint32_t)n_out);
    rc = 0;
out:
    free(all);
    free(logits);
    free(gen);
    free(kv);
    return rc;
}

/* --split P: local reference that prefills [0,P) and then [P,n) as two batches. */
static int run_split(eng *e, const args *a, const int32_t *toks, uint32_t n) {
    const uint32_t p = (uint32_t)a->split;
    const size_t nv = (size_t)e->n_vocab;
    float *logits = malloc(nv * sizeof(float));
    int32_t *gen = malloc(a->gen * sizeof(int32_t));
    float *steps = a->logits_out ? malloc(a->gen * nv * sizeof(float)) : NULL;
    int rc = -1;
    if (logits && gen && p < n && (steps || !a->logits_out)) {
        eng_reset(e);
        long n_out = -1;
        if ((p == 0 || eng_decode(e, toks, p, 0, NULL) == 0) &&
            eng_decode(e, toks + p, n - p, p, logits) == 0 &&
            (n_out = eng_generate(e, logits, n, a->gen, a->stop_eog, gen, steps)) >= 0 &&
            (!a->logits_out || write_file(a->logits_out, steps, (size_t)n_out * nv * sizeof(float)) == 0)) {
            print_generated(e, a, gen, (uint32_t)n_out);
            rc = 0;
        }
    } else {
        LOG("--split must be below the prompt length %u", n);
    }
    free(logits);
    free(gen);
    free(steps);
    return rc;
}

int main(int argc, char **argv) {
    args a;
    if (parse_args(argc, argv, &a) != 0) {
        usage();
        return 2;
    }
    eng e;
    char err[256];
    if (a.write_f32) {
        if (eng_dequantize(a.model, a.write_f32, a.threads, err, sizeof err) != 0) {
            LOG("%s", err);
            return 1;
        }
        return 0;
    }
    eng_options o = {a.model, a.threads, a.flash_attn, a.kv_f32, (uint32_t)a.ctx,
                     a.gpu >= 0 ? -1 : 0, a.gpu >= 0 ? a.gpu : 0};
    if (eng_open(&e, &o, err, sizeof err) != 0) {
        LOG("%s", err);
        return 1;
    }
    int rc = 1;
    int32_t *toks = NULL;
    long n = -1;
    if (a.sample > 0) {
        if ((uint32_t)a.sample > e.n_ctx) {
            LOG("--sample %ld exceeds the context of %u tokens", a.sample, e.n_ctx);
            goto done;
        }
        rc = run_sample(&e, &a) == 0 ? 0 : 1;
        goto done;
    }
    if (a.info) {
        eng_print_info(&e, stdout);
        rc = 0;
        goto done;
    }
    if (a.prompt || a.prompt_file) {
        char *text = a.prompt ? strdup(a.prompt) : read_file(a.prompt_file);
        char *chat = text && a.chat ? eng_chat_prompt(&e, text) : NULL;
        if (text && a.chat && !chat) {
            LOG("model %s has no chat template that llama.cpp can apply", a.model);
        } else if (text) {
            n = eng_tokenize(&e, chat ? chat : text, a.chat, &toks);
        }
        free(chat);
        free(text);
    } else {
        char *text = a.tokens ? strdup(a.tokens) : read_file(a.tokens_file);
        if (text) {
            n = parse_tokens(text, &toks, e.n_vocab);
            free(text);
        }
    }
    if (n <= 0) {
        LOG("empty or unreadable prompt");
        goto done;
    }
    if (a.max_tokens > 0 && n > a.max_tokens) {
        n = a.max_tokens;
    }
    if (a.print_prompt) {
        print_tokens("prompt_ids", toks, (uint32_t)n);
    }
    if ((uint64_t)n + a.gen > e.n_ctx) {
        LOG("prompt (%ld) + --gen (%u) exceed the context of %u tokens", n, a.gen, e.n_ctx);
        goto done;
    }
    if (a.selftest) {
        rc = run_selftest(&e, toks, (uint32_t)n, a.gen, a.flash_attn) == 0 ? 0 : 1;
    } else if (a.score > 0) {
        rc = run_score(&e, &a, toks, (uint32_t)n) == 0 ? 0 : 1;
    } else if (a.split >= 0) {
        rc = run_split(&e, &a, toks, (uint32_t)n) == 0 ? 0 : 1;
    } else {
        rc = run_request(&e, &a, toks, (uint32_t)n) == 0 ? 0 : 1;
    }
done:
    free(toks);
    eng_close(&e);
    return rc;
}
