/*
 * engine: the small slice of llama.cpp the example needs: load a GGUF model, decode a run of
 * tokens, greedy generation, and moving sequence 0's KV in and out as KVFetcher host buffers
 * (through kv_state). Not a general llama.cpp wrapper: one sequence, CPU, greedy.
 */
#ifndef KVF_LLAMA_ENGINE_H
#define KVF_LLAMA_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kv_state.h"

struct llama_model;
struct llama_context;

/* How to open the engine. */
typedef struct eng_options {
    const char *model_path; /* GGUF file */
    int threads;            /* CPU threads for decoding */
    int flash_attn;         /* 1: flash attention (V stored in rows), 0: off (V transposed) */
    int kv_f32;             /* 1: f32 KV cache, 0: f16 (what the store keeps bit-exact) */
    uint32_t n_ctx;         /* context size, 0: the model's training context */
    int32_t gpu_layers;     /* layers (and their KV cache) offloaded to a GPU; 0: CPU only, -1: all */
    int32_t main_gpu;       /* the one GPU they go to (llama.cpp's device index = CUDA ordinal) */
} eng_options;

/* An open model and context. */
typedef struct eng {
    struct llama_model *model;
    struct llama_context *ctx;
    int32_t n_vocab;
    uint32_t n_ctx;
    kvs_geometry geo; /* n_layer, kv_heads, head_dim, cache type, v_trans */
} eng;

/* Loads the model and creates a context; on failure writes a reason into err. */
int eng_open(eng *e, const eng_options *o, char *err, size_t err_len);

/* Frees everything eng_open created; safe on a zeroed or failed eng. */
void eng_close(eng *e);

/* Forgets every cached token (a fresh sequence 0). */
void eng_reset(eng *e);

/*
 * Decodes n tokens at positions pos0.. in batches of the context's n_batch; copies the logits of
 * the last token into logits (n_vocab floats) when not NULL. Returns 0 or -1.
 */
int eng_decode(eng *e, const int32_t *toks, uint32_t n, uint32_t pos0, float *logits);

/* Tokenizes text with the model's vocabulary: plain text with BOS first (where the vocabulary
 * adds one); with chat set, text rendered by a chat template, whose special tokens are parsed.
 * Returns the count (caller frees *out) or -1. */
long eng_tokenize(eng *e, const char *text, int chat, int32_t **out);

/* Drops sequence 0's cached tokens at positions >= keep. Returns 0 or -1. */
int eng_truncate(eng *e, uint32_t keep);

/* Index of the largest logit (ties: the lowest index). */
int32_t eng_argmax(const float *logits, int32_t n_vocab);

/*
 * Greedy generation: token i is argmax of the current logits (first: `logits`, which is
 * updated), then decoded at pos + i. Writes up to n_gen tokens to out and, when step_logits is
 * not NULL, the logits each choice was made from (n_gen * n_vocab floats). With stop_eog it
 * stops before an end-of-generation token (not written). Returns the count written, or -1.
 */
long eng_generate(eng *e, float *logits, uint32_t pos, uint32_t n_gen, int stop_eog, int32_t *out,
                  float *step_logits);

/* Decodes n tokens at positions pos0.. and copies every token's logits into all_logits
 * (n * n_vocab floats, in token order). Returns 0 or -1. */
int eng_decode_all(eng *e, const int32_t *toks, uint32_t n, uint32_t pos0, float *all_logits);

/* The vocabulary's beginning-of-sequence token (0 when it has none). */
int32_t eng_bos(const eng *e);

/* `user` as one user turn in the model's own chat template, with the assistant's turn opened.
 * The caller frees the result; NULL when the model has no template llama.cpp knows. */
char *eng_chat_prompt(const eng *e, const char *user);

/* The text of n tokens (special tokens left out). The caller frees it; NULL on failure. */
char *eng_detokenize(const eng *e, const int32_t *toks, uint32_t n);

/* Prints the KV geometry and the model's scalar GGUF metadata (tokenizer tables, arrays and
 * multi-line texts left out) as key=value lines: what a KV capture records about its model. */
void eng_print_info(const eng *e, FILE *f);

/*
 * Copies sequence 0's KV out of llama.cpp as a KVFetcher host buffer (per layer K then V,
 * [tokens, kv_heads, head_dim], the cache's type). The caller frees *host. Returns 0, or -1
 * with a reason in err.
 */
int eng_get_kv(eng *e, uint8_t **host, size_t *host_len, uint32_t *tokens, char *err,
               size_t err_len);

/*
 * Replaces sequence 0's KV by `tokens` tokens (positions 0..tokens-1) from a KVFetcher host
 * buffer in the cache's type. Returns 0, or -1 with a reason in err (the sequence is then empty).
 */
int eng_set_kv(eng *e, const uint8_t *host, size_t host_len, uint32_t tokens, char *err,
               size_t err_len);

/* eng_set_kv over one pointer per layer (each: K then V of `tokens` tokens, layer_len bytes),
 * as a fetch hands them out. */
int eng_set_kv_layers(eng *e, const uint8_t *const *layers, size_t layer_len, uint32_t tokens,
                      char *err, size_t err_len);

/*
 * Writes a copy of the GGUF model `in` with every weight dequantized to f32 (same values, no
 * quantized matrix products): llama.cpp's CPU kernels multiply quantized weights with
 * activations rounded to 8 bits, whose rounding makes any change of the KV, however small,
 * move the next-token distribution by a floor of its own. Returns 0, or -1 with err.
 */
int eng_dequantize(const char *in, const char *out, int threads, char *err, size_t err_len);

#endif
