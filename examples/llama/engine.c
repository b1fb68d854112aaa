/*
 * engine: llama.cpp calls of the example (see engine.h). Every llama.cpp entry point the example
 * uses is called from this file only.
 */
#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "llama.h"

/* The state blob layout kv_state.c reads and writes is the one of this llama.cpp. */
#if LLAMA_STATE_SEQ_VERSION != 3
#error "kv_state.c parses the sequence state of LLAMA_STATE_SEQ_VERSION 3 (llama-cpp-python 0.3.36)"
#endif

/* llama.cpp's default micro-batch (common/common.h n_ubatch). */
#define ENG_UBATCH 512u

_Static_assert(KVS_GGML_TYPE_F32 == GGML_TYPE_F32, "ggml type id of f32");
_Static_assert(KVS_GGML_TYPE_F16 == GGML_TYPE_F16, "ggml type id of f16");
_Static_assert(KVS_GGML_TYPE_BF16 == GGML_TYPE_BF16, "ggml type id of bf16");

/* llama.cpp's log: errors always, everything with KVF_LLAMA_VERBOSE set. */
static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR || getenv("KVF_LLAMA_VERBOSE")) {
        fputs(text, stderr);
    }
}

int eng_open(eng *e, const eng_options *o, char *err, size_t err_len) {
    memset(e, 0, sizeof(*e));
    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    if (o->gpu_layers != 0 && !llama_supports_gpu_offload()) {
        snprintf(err, err_len, "this llama.cpp build has no GPU backend (build it with -DGGML_CUDA=ON)");
        return -1;
    }
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = o->gpu_layers;
    /* One GPU holds every offloaded layer and its KV cache: the GPU the daemon fetches into. */
    mp.split_mode = LLAMA_SPLIT_MODE_NONE;
    mp.main_gpu = o->main_gpu;
    /* No extra CPU buffer types (AMX, weight repacking): seen here, ggml's AMX kernels crash on
     * Q4_1 weights (SmolLM2) on Sapphire Rapids hosts, and without them the CPU numerics do not
     * depend on which instruction set extensions a host has. */
    mp.use_extra_bufts = false;
    e->model = llama_model_load_from_file(o->model_path, mp);
    if (!e->model) {
        snprintf(err, err_len, "cannot load model %s", o->model_path);
        return -1;
    }
    const int32_t n_head = llama_model_n_head(e->model);
    const int32_t n_head_kv = llama_model_n_head_kv(e->model);
    const int32_t n_embd = llama_model_n_embd(e->model);
    if (n_head <= 0 || n_head_kv <= 0 || n_embd % n_head != 0) {
        snprintf(err, err_len, "model has an unsupported head layout");
        eng_close(e);
        return -1;
    }
    /* Caches this mapping cannot express (kv_state.h): refuse them by name, before any KV moves. */
    if (llama_model_n_swa(e->model) > 0) {
        snprintf(err, err_len,
                 "model %s has sliding-window attention layers (window %d): its KV cache is split "
                 "in two (llama_kv_cache_iswa), which KVFetcher's mapping does not cover yet",
                 o->model_path, llama_model_n_swa(e->model));
        eng_close(e);
        return -1;
    }
    if (llama_model_is_recurrent(e->model) || llama_model_is_hybrid(e->model)) {
        snprintf(err, err_len,
                 "model %s keeps recurrent state (Mamba/RWKV-style layers), not only a KV cache: "
                 "KVFetcher cannot map it",
                 o->model_path);
        eng_close(e);
        return -1;
    }
    e->geo.n_layer = (uint32_t)llama_model_n_layer(e->model);
    e->geo.kv_heads = (uint32_t)n_head_kv;
    e->geo.head_dim = (uint32_t)(n_embd / n_head);
    e->geo.ggml_type = o->kv_f32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
    e->geo.v_trans = o->flash_attn ? 0 : 1;
    e->n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(e->model));

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = o->n_ctx ? o->n_ctx : (uint32_t)llama_model_n_ctx_train(e->model);
    cp.n_batch = cp.n_ctx;
    /* Micro-batches of llama.cpp's default size: the compute buffers grow with n_ubatch times
     * the context (an 8k-context model with n_ubatch = n_ctx needs gigabytes for attention). */
    cp.n_ubatch = cp.n_ctx < ENG_UBATCH ? cp.n_ctx : ENG_UBATCH;
    cp.n_seq_max = 1;
    cp.n_threads = o->threads;
    cp.n_threads_batch = o->threads;
    cp.flash_attn_type = o->flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = (enum ggml_type)e->geo.ggml_type;
    cp.type_v = (enum ggml_type)e->geo.ggml_type;
    cp.no_perf = true;
    e->ctx = llama_init_from_model(e->model, cp);
    if (!e->ctx) {
        snprintf(err, err_len, "cannot create a llama.cpp context");
        eng_close(e);
        return -1;
    }
    e->n_ctx = llama_n_ctx(e->ctx);
    /* Warm-up: the first decode sets up thread pools and compute buffers (measured: over a
     * second on the shared dev machine), which must not count as time to first token. */
    const int32_t bos = eng_bos(e);
    if (eng_decode(e, &bos, 1, 0, NULL) != 0) {
        snprintf(err, err_len, "warm-up decode failed");
        eng_close(e);
        return -1;
    }
    eng_reset(e);
    return 0;
}

void eng_close(eng *e) {
    if (e->ctx) {
        llama_free(e->ctx);
    }
    if (e->model) {
        llama_model_free(e->model);
    }
    e->ctx = NULL;
    e->model = NULL;
}

void eng_reset(eng *e) { llama_memory_clear(llama_get_memory(e->ctx), true); }

/* Decodes n tokens at positions pos0.. in batches of n_batch. Copies the last token's logits
 * into `last` and every token's into `all` (n * n_vocab floats, token order); either may be
 * NULL (the last token's logits are computed either way, as llama.cpp's own callers do). */
static int decode(eng *e, const int32_t *toks, uint32_t n, uint32_t pos0, float *last, float *all) {
    if (n == 0 || (uint64_t)pos0 + n > e->n_ctx) {
        return -1;
    }
    const uint32_t step = llama_n_batch(e->ctx);
    const size_t nv = (size_t)e->n_vocab;
    struct llama_batch b = llama_batch_init((int32_t)step, 0, 1);
    int rc = 0;
    for (uint32_t done = 0; done < n && rc == 0; done += step) {
        const uint32_t m = n - done < step ? n - done : step;
        b.n_tokens = (int32_t)m;
        for (uint32_t i = 0; i < m; i++) {
            b.token[i] = toks[done + i];
            b.pos[i] = (llama_pos)(pos0 + done + i);
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = all != NULL || done + i == n - 1;
        }
        if (llama_decode(e->ctx, b) != 0) {
            rc = -1;
        }
        for (uint32_t i = 0; all && rc == 0 && i < m; i++) {
            const float *l = llama_get_logits_ith(e->ctx, (int32_t)i);
            if (!l) {
                rc = -1;
            } else {
                memcpy(all + (size_t)(done + i) * nv, l, nv * sizeof(float));
            }
        }
    }
    if (rc == 0 && last) {
        const float *l = llama_get_logits_ith(e->ctx, -1);
        if (!l) {
            rc = -1;
        } else {
            memcpy(last, l, nv * sizeof(float));
        }
    }
    llama_batch_free(b);
    return rc;
}

int eng_decode(eng *e, const int32_t *toks, uint32_t n, uint32_t pos0, float *logits) {
    return decode(e, toks, n, pos0, logits, NULL);
}

int eng_decode_all(eng *e, const int32_t *toks, uint32_t n, uint32_t pos0, float *all_logits) {
    return decode(e, toks, n, pos0, NULL, all_logits);
}

long eng_tokenize(eng *e, const char *text, int chat, int32_t **out) {
    const struct llama_vocab *v = llama_model_get_vocab(e->model);
    const int32_t len = (int32_t)strlen(text);
    /* Plain text gets the vocabulary's BOS; a chat template brings its own special tokens. */
    const bool add_special = !chat, parse_special = chat != 0;
    const int32_t need = -llama_tokenize(v, text, len, NULL, 0, add_special, parse_special);
    if (need <= 0) {
        return -1;
    }
    int32_t *t = malloc((size_t)need * sizeof(int32_t));
    if (!t || llama_tokenize(v, text, len, t, need, add_special, parse_special) != need) {
        free(t);
        return -1;
    }
    *out = t;
    return need;
}

int eng_truncate(eng *e, uint32_t keep) {
    return llama_memory_seq_rm(llama_get_memory(e->ctx), 0, (llama_pos)keep, -1) ? 0 : -1;
}

int32_t eng_argmax(const float *logits, int32_t n_vocab) {
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab; i++) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

long eng_generate(eng *e, float *logits, uint32_t pos, uint32_t n_gen, int stop_eog, int32_t *out,
                 float *step_logits) {
    const struct llama_vocab *v = llama_model_get_vocab(e->model);
    for (uint32_t i = 0; i < n_gen; i++) {
        if (step_logits) {
            memcpy(step_logits + (size_t)i * e->n_vocab, logits, (size_t)e->n_vocab * sizeof(float));
        }
        out[i] = eng_argmax(logits, e->n_vocab);
        if (stop_eog && llama_vocab_is_eog(v, out[i])) {
            return (long)i;
        }
        if (i + 1 < n_gen && eng_decode(e, &out[i], 1, pos + i, logits) != 0) {
            return -1;
        }
    }
    return (long)n_gen;
}

int32_t eng_bos(const eng *e) {
    const llama_token bos = llama_vocab_bos(llama_model_get_vocab(e->model));
    return bos >= 0 ? bos : 0;
}

char *eng_chat_prompt(const eng *e, const char *user) {
    const char *tmpl = llama_model_chat_template(e->model, NULL);
    if (!tmpl) {
        return NULL;
    }
    const struct llama_chat_message msg = {"user", user};
    const int32_t need = llama_chat_apply_template(tmpl, &msg, 1, true, NULL, 0);
    if (need < 0) {
        return NULL;
    }
    char *buf = malloc((size_t)need + 1);
    if (buf && llama_chat_apply_template(tmpl, &msg, 1, true, buf, need + 1) != need) {
        free(buf);
        return NULL;
    }
    if (buf) {
        buf[need] = 0;
    }
    return buf;
}

char *eng_detokenize(const eng *e, const int32_t *toks, uint32_t n) {
    const struct llama_vocab *v = llama_model_get_vocab(e->model);
    size_t cap = 64 + (size_t)n * 8, len = 0;
    char *out = malloc(cap);
    for (uint32_t i = 0; out && i < n; i++) {
        for (;;) {
            const int32_t got = llama_token_to_piece(v, toks[i], out + len, (int32_t)(cap - len - 1), 0, false);
            if (got >= 0) {
                len += (size_t)got;
                break;
            }
            char *grown = realloc(out, cap = cap * 2 + (size_t)-got);
            if (!grown) {
                free(out);
                return NULL;
            }
            out = grown;
        }
    }
    if (out) {
        out[len] = 0;
    }
    return out;
}

void eng_print_info(const eng *e, FILE *f) {
    char key[256], val[512];
    fprintf(f, "n_layer=%u\nkv_heads=%u\nhead_dim=%u\nn_vocab=%d\nn_ctx_train=%d\nrope_type=%d\n",
            e->geo.n_layer, e->geo.kv_heads, e->geo.head_dim, e->n_vocab,
            llama_model_n_ctx_train(e->model), (int)llama_model_rope_type(e->model));
    const int32_t n = llama_model_meta_count(e->model);
    for (int32_t i = 0; i < n; i++) {
        if (llama_model_meta_key_by_index(e->model, i, key, sizeof key) < 0 ||
            strncmp(key, "tokenizer.", 10) == 0) {
            continue;
        }
        const int32_t vl = llama_model_meta_val_str_by_index(e->model, i, val, sizeof val);
        if (vl < 0 || (size_t)vl >= sizeof val || strchr(val, '\n')) {
            continue; /* arrays and long texts (chat templates) are not model geometry */
        }
        fprintf(f, "meta.%s=%s\n", key, val);
    }
}

int eng_get_kv(eng *e, uint8_t **host, size_t *host_len, uint32_t *tokens, char *err,
               size_t err_len) {
    *host = NULL;
    const size_t n = llama_state_seq_get_size(e->ctx, 0);
    uint8_t *blob = malloc(n ? n : 1);
    if (!blob) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    if (llama_state_seq_get_data(e->ctx, blob, n, 0) != n) {
        snprintf(err, err_len, "llama_state_seq_get_data wrote an unexpected size");
        free(blob);
        return -1;
    }
    kvs_geometry g = e->geo;
    uint32_t t = 0;
    kvs_error ke = kvs_parse(blob, n, &g, &t, NULL, 0);
    if (ke == KVS_OK && (g.ggml_type != e->geo.ggml_type || g.v_trans != e->geo.v_trans)) {
        ke = KVS_ERR_TYPE;
    }
    size_t len = ke == KVS_OK ? kvs_host_size(&g, t) : 0;
    uint8_t *out = ke == KVS_OK ? malloc(len ? len : 1) : NULL;
    if (ke == KVS_OK && !out) {
        ke = KVS_ERR_NOMEM;
    }
    if (ke == KVS_OK) {
        ke = kvs_parse(blob, n, &g, &t, out, len);
    }
    free(blob);
    if (ke != KVS_OK) {
        snprintf(err, err_len, "parsing llama.cpp state: %s", kvs_strerror(ke));
        free(out);
        return -1;
    }
    *host = out;
    *host_len = len;
    *tokens = t;
    return 0;
}

static int set_blob(eng *e, uint8_t *blob, size_t n, kvs_error ke, char *err, size_t err_len) {
    if (ke != KVS_OK) {
        snprintf(err, err_len, "building llama.cpp state: %s", kvs_strerror(ke));
        free(blob);
        return -1;
    }
    const size_t used = llama_state_seq_set_data(e->ctx, blob, n, 0);
    free(blob);
    if (used != n) {
        eng_reset(e);
        snprintf(err, err_len, "llama_state_seq_set_data rejected the state (%zu of %zu bytes)", used, n);
        return -1;
    }
    return 0;
}

int eng_set_kv(eng *e, const uint8_t *host, size_t host_len, uint32_t tokens, char *err,
               size_t err_len) {
    if (tokens == 0 || tokens > e->n_ctx) {
        snprintf(err, err_len, "%u tokens do not fit the context of %u", tokens, e->n_ctx);
        return -1;
    }
    const size_t n = kvs_blob_size(&e->geo, tokens);
    uint8_t *blob = malloc(n);
    if (!blob) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    return set_blob(e, blob, n, kvs_build(&e->geo, tokens, host, host_len, blob, n), err, err_len);
}

int eng_set_kv_layers(eng *e, const uint8_t *const *layers, size_t layer_len, uint32_t tokens,
                      char *err, size_t err_len) {
    if (tokens == 0 || tokens > e->n_ctx) {
        snprintf(err, err_len, "%u tokens do not fit the context of %u", tokens, e->n_ctx);
        return -1;
    }
    const size_t n = kvs_blob_size(&e->geo, tokens);
    uint8_t *blob = malloc(n);
    if (!blob) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    return set_blob(e, blob, n, kvs_build_layers(&e->geo, tokens, layers, layer_len, blob, n), err,
                    err_len);
}

int eng_dequantize(const char *in, const char *out, int threads, char *err, size_t err_len) {
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_quantize_params p = llama_model_quantize_default_params();
    p.nthread = threads;
    p.ftype = LLAMA_FTYPE_ALL_F32;
    p.output_tensor_type = GGML_TYPE_F32;
    p.token_embedding_type = GGML_TYPE_F32;
    p.allow_requantize = true;
    p.pure = true;
    if (llama_model_quantize(in, out, &p) != 0) {
        snprintf(err, err_len, "cannot write an f32 copy of %s to %s", in, out);
        return -1;
    }
    return 0;
}
